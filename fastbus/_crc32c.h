/*
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI
 * (RFC 3720), ext4, Kafka record batches and LevelDB/RocksDB.
 *
 * fb_crc32c(crc, p, n) continues a CRC: fb_crc32c(fb_crc32c(0, a), b) is the CRC
 * of a followed by b (the pre- and post-inversion are done inside).
 *
 * Three implementations, chosen once at run time by fb_crc32c_init():
 *   - x86-64: the SSE4.2 CRC32 instruction (_mm_crc32_u64). Only that one function
 *     is compiled for SSE4.2, with __attribute__((target("sse4.2"))), and it is
 *     called only when __builtin_cpu_supports("sse4.2") says so: the extension
 *     is NOT built with -msse4.2 and still runs on any x86-64 CPU.
 *   - AArch64 built with the CRC extension (__ARM_FEATURE_CRC32, e.g. Apple
 *     silicon, or -march=armv8.1-a and later): the CRC32CX instruction. Other ARM
 *     builds use the table (no run-time detection there).
 *   - everywhere else: slicing-by-8 tables (8 x 256 entries, built at init).
 *
 * All functions are pure C, thread-safe after fb_crc32c_init() (which the module
 * calls once at import, holding the GIL), and need no GIL.
 */
#ifndef FASTBUS_CRC32C_H
#define FASTBUS_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FB_CRC32C_POLY 0x82F63B78u

static uint32_t fb_crc32c_table[8][256];
static int fb_crc32c_use_hw = 0;    /* 1 when the hardware path is used */
static int fb_crc32c_hw_present = 0; /* 1 when the CPU has it (tests compare both) */

/* ---- portable slicing-by-8 ------------------------------------------------ */

static uint32_t fb_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n && ((uintptr_t)p & 7u)) {
        crc = fb_crc32c_table[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        /* Assembled from bytes so the result does not depend on the host's byte
           order; compilers turn this into one load on little-endian hosts. */
        uint32_t lo = ((uint32_t)p[0] | ((uint32_t)p[1] << 8) |
                       ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24)) ^ crc;
        uint32_t hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) |
                      ((uint32_t)p[6] << 16) | ((uint32_t)p[7] << 24);
        crc = fb_crc32c_table[7][lo & 0xFFu] ^ fb_crc32c_table[6][(lo >> 8) & 0xFFu] ^
              fb_crc32c_table[5][(lo >> 16) & 0xFFu] ^ fb_crc32c_table[4][lo >> 24] ^
              fb_crc32c_table[3][hi & 0xFFu] ^ fb_crc32c_table[2][(hi >> 8) & 0xFFu] ^
              fb_crc32c_table[1][(hi >> 16) & 0xFFu] ^ fb_crc32c_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) {
        crc = fb_crc32c_table[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
    }
    return ~crc;
}

/* ---- x86-64: SSE4.2 ---------------------------------------------------------- */

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FB_CRC32C_HAVE_X86 1
#include <nmmintrin.h>

__attribute__((target("sse4.2")))
static uint32_t fb_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7u)) {
        c = _mm_crc32_u8(c, *p++);
        n--;
    }
#if defined(__x86_64__)
    {
        uint64_t c64 = c;
        while (n >= 8) {
            uint64_t w;
            memcpy(&w, p, 8); /* x86 is little-endian: the byte order CRC32C wants */
            c64 = _mm_crc32_u64(c64, w);
            p += 8;
            n -= 8;
        }
        c = (uint32_t)c64;
    }
#else
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        c = _mm_crc32_u32(c, w);
        p += 4;
        n -= 4;
    }
#endif
    while (n--) {
        c = _mm_crc32_u8(c, *p++);
    }
    return ~c;
}

/* The CRCs of three buffers of n bytes each (each from 0), with the three chains of
   CRC instructions interleaved: one instruction has a latency of 3 cycles and a
   throughput of 1 a cycle, so three independent chains run in the time of one. */
__attribute__((target("sse4.2")))
static void fb_crc32c_hw_3(const uint8_t *a, const uint8_t *b, const uint8_t *c, size_t n,
                           uint32_t *out)
{
#if defined(__x86_64__)
    uint64_t x = 0xFFFFFFFFu, y = 0xFFFFFFFFu, z = 0xFFFFFFFFu;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t u, v, w;
        memcpy(&u, a + i, 8);
        memcpy(&v, b + i, 8);
        memcpy(&w, c + i, 8);
        x = _mm_crc32_u64(x, u);
        y = _mm_crc32_u64(y, v);
        z = _mm_crc32_u64(z, w);
    }
    uint32_t X = (uint32_t)x, Y = (uint32_t)y, Z = (uint32_t)z;
#else
    uint32_t X = 0xFFFFFFFFu, Y = 0xFFFFFFFFu, Z = 0xFFFFFFFFu;
    size_t i = 0;
#endif
    for (; i < n; i++) {
        X = _mm_crc32_u8(X, a[i]);
        Y = _mm_crc32_u8(Y, b[i]);
        Z = _mm_crc32_u8(Z, c[i]);
    }
    out[0] = ~X;
    out[1] = ~Y;
    out[2] = ~Z;
}

static int fb_crc32c_detect_hw(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

/* ---- AArch64 with the CRC extension at compile time ---------------------------- */

#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#define FB_CRC32C_HAVE_ARM 1
#include <arm_acle.h>

static uint32_t fb_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7u)) {
        c = __crc32cb(c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* AArch64 Linux/macOS are little-endian */
        c = __crc32cd(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) {
        c = __crc32cb(c, *p++);
    }
    return ~c;
}

static int fb_crc32c_detect_hw(void) { return 1; }

#else

static uint32_t fb_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    return fb_crc32c_sw(crc, p, n);
}

static int fb_crc32c_detect_hw(void) { return 0; }

#endif

/* ---- dispatch ---------------------------------------------------------------- */

static void fb_crc32c_init(void)
{
    uint32_t i, c;
    int k, t;
    for (i = 0; i < 256; i++) {
        c = i;
        for (k = 0; k < 8; k++) {
            c = (c >> 1) ^ (FB_CRC32C_POLY & (0u - (c & 1u)));
        }
        fb_crc32c_table[0][i] = c;
    }
    for (i = 0; i < 256; i++) {
        c = fb_crc32c_table[0][i];
        for (t = 1; t < 8; t++) {
            c = fb_crc32c_table[0][c & 0xFFu] ^ (c >> 8);
            fb_crc32c_table[t][i] = c;
        }
    }
    fb_crc32c_hw_present = fb_crc32c_detect_hw();
    fb_crc32c_use_hw = fb_crc32c_hw_present;
}

static inline uint32_t fb_crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    return fb_crc32c_use_hw ? fb_crc32c_hw(crc, p, n) : fb_crc32c_sw(crc, p, n);
}

/* fb_crc32c(0, a, n), fb_crc32c(0, b, n) and fb_crc32c(0, c, n) into out[0..2]. */
static inline void fb_crc32c_3(const uint8_t *a, const uint8_t *b, const uint8_t *c,
                               size_t n, uint32_t *out)
{
#if defined(FB_CRC32C_HAVE_X86)
    if (fb_crc32c_use_hw) {
        fb_crc32c_hw_3(a, b, c, n, out);
        return;
    }
#endif
    out[0] = fb_crc32c(0, a, n);
    out[1] = fb_crc32c(0, b, n);
    out[2] = fb_crc32c(0, c, n);
}

#endif /* FASTBUS_CRC32C_H */
