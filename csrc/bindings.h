// Each native component registers its functions on the tierkv._C module here; module.cpp calls them all.
#pragma once
#include <nanobind/nanobind.h>

namespace tierkv {

void bind_codec(nanobind::module_& m);         // codec_cpu.cpp: quantize / dequantize / all_finite
void bind_prefix_index(nanobind::module_& m);  // prefix_index.cpp: PrefixIndex

}  // namespace tierkv
