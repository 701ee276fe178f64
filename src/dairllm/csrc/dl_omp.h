/* dl_omp.h: OpenMP queries that still compile (as one thread) when the build has no OpenMP. */
#ifndef DL_OMP_H
#define DL_OMP_H
#ifdef _OPENMP
#include <omp.h>
static inline int dl_omp_enabled(void) { return 1; }
static inline int dl_omp_max_threads(void) { return omp_get_max_threads(); }
static inline int dl_omp_thread_num(void) { return omp_get_thread_num(); }
#else
static inline int dl_omp_enabled(void) { return 0; }
static inline int dl_omp_max_threads(void) { return 1; }
static inline int dl_omp_thread_num(void) { return 0; }
#endif
#endif
