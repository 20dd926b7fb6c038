// memory.cpp — advise_huge_pages (see nf4lora/memory.h). Used by the Python op layer on fresh
// CPU outputs of at least 4 MiB; tested indirectly (results are identical with or without it).
#include "nf4lora/memory.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nf4lora {

bool advise_huge_pages(void* ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (ptr == nullptr || nbytes < int64_t(kHuge)) return false;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + uintptr_t(nbytes)) & ~(kHuge - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

}  // namespace nf4lora
