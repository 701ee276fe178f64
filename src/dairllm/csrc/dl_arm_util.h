/* dl_arm_util.h: NEON helpers shared by the ARM kernel files (dl_arm.c, dl_arm_kquant.c). */
#ifndef DL_ARM_UTIL_H
#define DL_ARM_UTIL_H

#include <arm_neon.h>
#include <stdint.h>

#define DL_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

static inline float neon_f16(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

#endif
