/* dzip_print: print the tensors of a .dzip file, read by the C reader (c/dzip.c).
 *
 *     cc -std=c99 -O2 -ffp-contract=off dzip.c dzip_print.c -lm -o dzip_print
 *     ./dzip_print model.dzip              name, dtype, shape, sum and range per tensor
 *     ./dzip_print --dump OUT model.dzip   every tensor, for a test to compare bit for bit:
 *         u32 count; per tensor u32 name length, name, u32 ndim, i64 shape[ndim],
 *         f32 values[numel] (little-endian, as this machine writes them)
 *     ./dzip_print --check FILE...         one line per file: "ok N" (N tensors) or
 *         "refused REASON": for running many hostile files under a sanitizer
 *
 * Exit status 0, or 1 with the reader's one-line reason on stderr.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dzip.h"

static uint8_t *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t cap = 0, n = 0, got;
    if (!f) return NULL;
    do {
        if (n == cap) {
            uint8_t *b;
            cap = cap ? 2 * cap : 1 << 16;
            b = realloc(buf, cap);
            if (!b) { free(buf); fclose(f); return NULL; }
            buf = b;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    fclose(f);
    *len = n;
    return buf;
}

static void put_u32(FILE *f, uint32_t v) { fwrite(&v, 4, 1, f); }

int main(int argc, char **argv) {
    const char *dump = NULL, *path;
    uint8_t *buf;
    size_t len = 0, i;
    dzip_file file;
    if (argc >= 2 && !strcmp(argv[1], "--check")) {
        int k;
        for (k = 2; k < argc; k++) {
            buf = slurp(argv[k], &len);
            if (!buf) {
                printf("unreadable\n");
                continue;
            }
            if (dzip_read(buf, len, &file) == 0) printf("ok %zu\n", file.count);
            else printf("refused %s\n", file.error);
            dzip_free(&file);
            free(buf);
        }
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "--dump")) dump = argv[2];
    else if (argc != 2) {
        fprintf(stderr, "usage: dzip_print [--dump OUT] FILE.dzip\n");
        return 2;
    }
    path = argv[argc - 1];
    buf = slurp(path, &len);
    if (!buf) {
        fprintf(stderr, "dzip_print: cannot read %s\n", path);
        return 1;
    }
    if (dzip_read(buf, len, &file) != 0) {
        fprintf(stderr, "dzip_print: %s: %s\n", path, file.error);
        free(buf);
        return 1;
    }
    free(buf);
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f) { dzip_free(&file); return 1; }
        put_u32(f, (uint32_t)file.count);
        for (i = 0; i < file.count; i++) {
            const dzip_tensor *t = &file.tensors[i];
            put_u32(f, (uint32_t)strlen(t->name));
            fwrite(t->name, 1, strlen(t->name), f);
            put_u32(f, (uint32_t)t->ndim);
            fwrite(t->shape, sizeof(int64_t), (size_t)t->ndim, f);
            if (t->numel) fwrite(t->data, sizeof(float), (size_t)t->numel, f);
        }
        fclose(f);
    } else {
        printf("%s: format version %d, %zu tensors%s%s\n", path, file.version, file.count,
               file.arch[0] ? ", architecture " : "", file.arch);
        for (i = 0; i < file.count; i++) {
            const dzip_tensor *t = &file.tensors[i];
            double sum = 0;
            float lo = 0, hi = 0;
            int64_t j;
            int d;
            for (j = 0; j < t->numel; j++) {
                float v = t->data[j];
                sum += v;
                if (j == 0 || v < lo) lo = v;
                if (j == 0 || v > hi) hi = v;
            }
            printf("%-40s %-8s [", t->name, t->dtype);
            for (d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
            printf("]  sum %.6g  range [%.6g, %.6g]\n", sum, lo, hi);
        }
    }
    dzip_free(&file);
    return 0;
}
