# Finds OpenBLAS for kept, preferring Debian's OpenMP build (libopenblas-openmp-dev): kept's
# CPU kernels run under OpenMP, and OpenBLAS's OpenMP build runs single-threaded when called
# from inside an OpenMP parallel region instead of oversubscribing the cores.
# Defines the imported target kept::openblas.
include(FindPackageHandleStandardArgs)
set(_kept_openblas_hints
    /usr/lib/x86_64-linux-gnu/openblas-openmp /usr/lib/aarch64-linux-gnu/openblas-openmp
    /usr/lib/x86_64-linux-gnu/openblas-pthread /usr/lib/aarch64-linux-gnu/openblas-pthread)
set(_kept_openblas_include_hints
    /usr/include/x86_64-linux-gnu/openblas-openmp /usr/include/aarch64-linux-gnu/openblas-openmp
    /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/aarch64-linux-gnu/openblas-pthread
    /usr/include/openblas)
find_library(KEPT_OPENBLAS_LIBRARY NAMES openblas HINTS ${_kept_openblas_hints})
find_path(KEPT_OPENBLAS_INCLUDE_DIR NAMES cblas.h HINTS ${_kept_openblas_include_hints})
find_package_handle_standard_args(KeptOpenBLAS
  REQUIRED_VARS KEPT_OPENBLAS_LIBRARY KEPT_OPENBLAS_INCLUDE_DIR
  FAIL_MESSAGE "OpenBLAS not found: install it with 'apt-get install libopenblas-openmp-dev'")
if(KeptOpenBLAS_FOUND AND NOT TARGET kept::openblas)
  add_library(kept::openblas UNKNOWN IMPORTED)
  set_target_properties(kept::openblas PROPERTIES
    IMPORTED_LOCATION "${KEPT_OPENBLAS_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${KEPT_OPENBLAS_INCLUDE_DIR}")
endif()
