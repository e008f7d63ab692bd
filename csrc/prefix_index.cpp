// The native prefix index: 16-byte keys -> location, longest-prefix walks in one call.
#include "bindings.h"

namespace tierkv {

void bind_prefix_index(nanobind::module_&) {}

}  // namespace tierkv
