/* vfswalk: print one line per entry of a tree, for comparing a guest's view with the host's.
 *
 * Built static and run inside the test guest (busybox has no getfattr and no readlink -n on
 * odd names). Each line: "E" then space-separated fields, byte strings in hex:
 *   path type mode uid gid size sha256|- target|- major:minor|- dev:ino xattrs
 * where xattrs is "-" or name=value pairs (hex) joined by ",". Exit status 1 on any error. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

static int failed;

static void hex(const unsigned char *p, size_t n) {
    if (n == 0) { fputs("-", stdout); return; }
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
}

/* SHA-256 (FIPS 180-4), compact. */
static const uint32_t K[64] = {
    0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
    0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
    0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
    0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
    0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
    0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
    0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
    0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
static void block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
    for (int i = 16; i < 64; i++)
        w[i] = w[i-16] + (ROR(w[i-15], 7) ^ ROR(w[i-15], 18) ^ (w[i-15] >> 3)) + w[i-7]
             + (ROR(w[i-2], 17) ^ ROR(w[i-2], 19) ^ (w[i-2] >> 10));
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}
static int sha256_file(const char *path, unsigned char out[32]) {
    uint32_t h[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,
                     0x1f83d9ab,0x5be0cd19};
    static unsigned char buf[1 << 16];
    unsigned char tail[128];
    uint64_t total = 0;
    size_t have = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof(buf) - have);
        if (n < 0) { close(fd); return -1; }
        if (n == 0) break;
        total += (uint64_t)n; have += (size_t)n;
        size_t whole = have / 64 * 64;
        for (size_t i = 0; i < whole; i += 64) block(h, buf + i);
        memmove(buf, buf + whole, have - whole);
        have -= whole;
    }
    close(fd);
    memset(tail, 0, sizeof(tail));
    memcpy(tail, buf, have);
    tail[have] = 0x80;
    size_t len = have + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = total * 8;
    for (int i = 0; i < 8; i++) tail[len - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t i = 0; i < len; i += 64) block(h, tail + i);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) out[4*i+j] = (unsigned char)(h[i] >> (24 - 8 * j));
    return 0;
}

static void entry(const char *full, const char *rel) {
    struct stat st;
    if (lstat(full, &st) != 0) { perror(full); failed = 1; return; }
    const char *type = S_ISREG(st.st_mode) ? "reg" : S_ISDIR(st.st_mode) ? "dir"
        : S_ISLNK(st.st_mode) ? "lnk" : S_ISCHR(st.st_mode) ? "chr" : S_ISBLK(st.st_mode) ? "blk"
        : S_ISFIFO(st.st_mode) ? "fifo" : "sock";
    fputs("E ", stdout);
    hex((const unsigned char *)rel, strlen(rel));
    printf(" %s %o %u %u %lld ", type, st.st_mode & 07777, st.st_uid, st.st_gid,
           (long long)st.st_size);
    unsigned char digest[32];
    if (S_ISREG(st.st_mode)) {
        if (sha256_file(full, digest) != 0) { perror(full); failed = 1; fputs("-", stdout); }
        else hex(digest, 32);
    } else fputs("-", stdout);
    putchar(' ');
    char target[4096];
    ssize_t tn = S_ISLNK(st.st_mode) ? readlink(full, target, sizeof(target)) : 0;
    hex((unsigned char *)target, tn > 0 ? (size_t)tn : 0);
    if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode))
        printf(" %u:%u", major(st.st_rdev), minor(st.st_rdev));
    else fputs(" -", stdout);
    printf(" %llu:%llu ", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    char names[65536];
    static unsigned char value[65536];
    ssize_t ln = llistxattr(full, names, sizeof(names));
    if (ln <= 0) fputs("-", stdout);
    for (ssize_t off = 0, first = 1; off < ln; off += (ssize_t)strlen(names + off) + 1, first = 0) {
        ssize_t vn = lgetxattr(full, names + off, value, sizeof(value));
        if (vn < 0) { perror(names + off); failed = 1; vn = 0; }
        if (!first) putchar(',');
        hex((unsigned char *)names + off, strlen(names + off));
        putchar('=');
        if (vn == 0) fputs("-", stdout); else hex(value, (size_t)vn);
    }
    putchar('\n');
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(full);
        if (!d) { perror(full); failed = 1; return; }
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
            char *f2, *r2;
            if (asprintf(&f2, "%s/%s", full, de->d_name) < 0) exit(2);
            if (asprintf(&r2, "%s/%s", strcmp(rel, "/") ? rel : "", de->d_name) < 0) exit(2);
            entry(f2, r2);
            free(f2);
            free(r2);
        }
        closedir(d);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: vfswalk DIR\n"); return 2; }
    entry(argv[1], "/");
    fflush(stdout);
    return failed;
}
