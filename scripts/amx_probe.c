/* Exits 0 where this process may run AMX: it asks the kernel for the tile state (ARCH_REQ_XCOMP_PERM)
 * and runs one int8 tile multiply. Some VMs advertise AMX in cpuid that the hypervisor does not
 * enable; there ggml's AMX kernels die with SIGILL on the first quantized matmul, and so does this.
 * scripts/setup.sh builds llama.cpp's AMX kernels only where it exits 0. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 1;
    struct { uint8_t palette, start, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) cfg;
    static int8_t a[16 * 64], b[16 * 64];
    static int32_t c[16 * 16];
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 3; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
    return c[0];
}
