/* A QEMU TCG plugin (plugin API version 1, QEMU 7.2): counts how many times
 * each translated block inside [lo, hi) runs, and writes "vaddr insns count"
 * per block at exit. Instruction counts are deterministic for a given binary
 * and input, whatever else the shared machine does, which wall-clock time
 * under TCG is not. Built and driven by `cargo xtask profile`. The few API
 * declarations it needs are written out here: Debian ships no plugin header. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*atexit_cb)(qemu_plugin_id_t, void *);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *,
                                              enum qemu_plugin_op, void *,
                                              uint64_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, atexit_cb, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

struct block {
    uint64_t vaddr, insns, count;
    struct block *next;
};
static struct block *blocks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char out[512] = "tbcount.txt";
static uint64_t lo, hi = UINT64_MAX;

static void translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    uint64_t vaddr = qemu_plugin_tb_vaddr(tb);
    struct block *b;
    (void)id;
    if (vaddr < lo || vaddr >= hi)
        return;
    b = calloc(1, sizeof *b);
    if (!b)
        return;
    b->vaddr = vaddr;
    b->insns = qemu_plugin_tb_n_insns(tb);
    pthread_mutex_lock(&lock);
    b->next = blocks;
    blocks = b;
    pthread_mutex_unlock(&lock);
    /* The counter is bumped by the translated code itself: no callback. */
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64,
                                             &b->count, 1);
}

static void finished(qemu_plugin_id_t id, void *unused) {
    FILE *f = fopen(out, "w");
    (void)id;
    (void)unused;
    if (!f)
        return;
    for (struct block *b = blocks; b; b = b->next)
        if (b->count)
            fprintf(f, "%llx %llu %llu\n", (unsigned long long)b->vaddr,
                    (unsigned long long)b->insns, (unsigned long long)b->count);
    fclose(f);
}

__attribute__((visibility("default"))) int
qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4))
            snprintf(out, sizeof out, "%s", argv[i] + 4);
        else if (!strncmp(argv[i], "lo=", 3))
            lo = strtoull(argv[i] + 3, NULL, 16);
        else if (!strncmp(argv[i], "hi=", 3))
            hi = strtoull(argv[i] + 3, NULL, 16);
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, translated);
    qemu_plugin_register_atexit_cb(id, finished, NULL);
    return 0;
}
