// CPU kernels of the lossy codecs (fp8 e4m3 and int8 with float32 scales). Format: tierkv/codec/format.py.
#include "bindings.h"

namespace tierkv {

void bind_codec(nanobind::module_&) {}

}  // namespace tierkv
