/* lmc kernels, family "common": copies, strided gathers, activations (declared in lmc_kernels.h). */
#ifndef LMC_KERNELS_COMMON_H
#define LMC_KERNELS_COMMON_H
#include "lmc_kernels.h"
#endif /* LMC_KERNELS_COMMON_H */
