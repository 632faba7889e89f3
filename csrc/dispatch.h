// Which kernel table runs: chosen once from what the CPU supports, and forcible to a lower one.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace lfm {

// The tables compiled into this build that this CPU (and OS) can run, lowest first; the scalar
// table is always first.
const std::vector<const KernelTable*>& usable_kernel_tables();

// The table every call uses: the best usable one, unless set_active_kernels() chose another.
const KernelTable& active_kernels();

// Makes the usable table named `isa` the active one. Returns false, changing nothing, if no
// usable table has that name.
bool set_active_kernels(const std::string& isa);

// The kernels of `table` for one weight type, or nullptr for a type it does not handle.
const QTypeKernels* kernels_for(const KernelTable& table, QType qtype);

}  // namespace lfm
