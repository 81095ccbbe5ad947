/*
 * scenario_exec.c - the "scenario CPU" of the mmsvc kernel runner (the oracle).
 *
 * Why C and why this shape: the trace format assumes that every scenario process starts with an
 * EMPTY address space, so that mlockall(), VmLck and the unevictable_pgs_* counters see only the
 * scenario's own mappings.  A Python (or even an ordinary C) process has a binary, libc, a heap
 * and a stack, all of which mlockall() would lock.  So a scenario process here runs from a tiny
 * runtime ("rt") that lives in ONE shared hugetlb mapping: mlock_fixup() skips hugetlb VMAs
 * (no VM_LOCKED, no locked_vm, no page walk, no batch entries), hugetlb pages are never on an
 * LRU, and a MAP_SHARED mapping is never copied-on-write after fork.  Every other VMA of the
 * process (binary, libc, heap, stack) is unmapped before the first command; what remains are the
 * hugetlb runtime and the kernel's [vdso]/[vvar] special mappings, which mlock also skips.
 *
 * The runtime is the code in the ELF section "mmrt": freestanding functions (raw syscalls, no
 * libc, no global data, no string constants, no jump tables) copied into the hugetlb mapping and
 * executed there.  Each process has a 64 KiB "slot" in that mapping: a small header (its pipe
 * fds) and its stack.  A trace `fork` is a raw fork() whose child switches to its own slot's
 * stack before touching memory, so parent and child never share a stack.
 *
 * The coordinator (the ordinary C code below the runtime, running on the DRIVER cpu) reads line
 * commands from stdin, relays binary commands to the scenario processes over pipes, and answers
 * on stdout.  The scenario processes run pinned to the SCENARIO cpu.  Slot 0 is a hidden "drainer"
 * process whose only job is to drain the scenario cpu's per-cpu LRU/mlock batches (see OP_DRAIN).
 *
 * Line protocol (one reply line per command, "ok ..." or "err MESSAGE"):
 *   F PAGES PREFILL       create a tmpfs file in /dev/shm (unlinked at once), reply: ok FD
 *   D                     drain the coordinator's own cpu (after prefilling files)
 *   S SLOT [THP]          spawn a root scenario process in SLOT, reply: ok PID (slot 0 is the
 *                         drainer: it also gets its scratch page at DRAIN_SCRATCH); THP 1
 *                         leaves transparent hugepages allowed (a trace with "thp": true)
 *   R                     drain the scenario cpu (the drainer runs OP_DRAIN)
 *   C SLOT OP A0..A6      run runtime command OP in SLOT, reply: ok RET AUX | dead
 *   X SLOT                make SLOT exit, reply ok once its address space is torn down
 *   P SLOT PID            register a forked process (pid from a FORK reply) for SLOT
 *   O FD PAGES            observe a file's page-cache pages, reply: ok TOKEN... (kpageflags
 *                         hex or "-" where the page is not in the cache)
 *   Q                     kill every scenario process, drain, exit
 * x86-64 only (raw syscall numbers, ucontext layout).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <sys/wait.h>
#include <unistd.h>
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#define HAVE_GLIBC_RSEQ 1
#endif

#if !defined(__x86_64__)
#error "scenario_exec.c supports x86-64 only"
#endif

#define PAGE 4096L
#define REGION_SIZE (2L << 20)   /* one 2 MiB hugetlb page */
#define CODE_SIZE (64L << 10)    /* runtime code copy at the start of the region */
#define SLOT_SIZE (64L << 10)    /* per-process header + stack */
#define MAX_SLOTS ((int)((REGION_SIZE - CODE_SIZE) / SLOT_SIZE))
#define MAX_RANGES 128
#define RT_SA_RESTORER 0x04000000L /* kernel ABI, not exported by glibc */
#define DRAIN_SCRATCH 0x0000100000000000L /* in the drainer only */

/* runtime command codes (mirrored in mmsvc/conformance/protocol.py) */
enum {
    OP_PING = 0,
    OP_SYS = 1,      /* a0 = syscall number, a1..a6 = arguments: raw syscall, returns -errno */
    OP_TOUCH = 2,    /* a0 = addr, a1 = pages, a2 = write: ret 0 or signal, aux = pages done */
    OP_FORK = 3,     /* a0 = child slot: ret = child pid */
    OP_EXIT = 4,     /* exit_group(0), no reply */
    OP_RLIMIT = 5,   /* a0 = soft, a1 = hard (-2 = keep): RLIMIT_MEMLOCK via prlimit64 */
    OP_DROPCAP = 6,  /* a0 = capability number: drop from effective/permitted/inheritable */
    OP_SHMNEW = 7,   /* a0 = addr, a1 = bytes: ret = shmid, aux = shmat result */
    OP_DRAIN = 8,    /* a0 = addr of an untouched scratch page: mlock2(ONFAULT) + munlock */
};

struct rt_cmd {
    long op;
    long a[7];
};

struct rt_rep {
    long ret;
    long aux;
};

/* The header at the start of each slot; written by the coordinator before any spawn. */
struct rt_slot {
    long cmd_fd;
    long rep_fd;
    long base; /* address of the hugetlb region */
    long index;
    long nranges; /* ranges to unmap when a root process enters the runtime */
    long ranges[MAX_RANGES][2];
};

/* ------------------------------------------------------------------------------------------ */
/* runtime: everything in section "mmrt" must be position independent and self-contained     */
/* ------------------------------------------------------------------------------------------ */

#define RT __attribute__((section("mmrt"), noinline, used))
#define RTI static inline __attribute__((always_inline))

RTI long rt_sys(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/*
 * touch primitives: a fault on one of the two marked instructions is turned by the SIGSEGV /
 * SIGBUS handler into a return of the signal number (a real process would have died; the trace
 * reports the signal instead).  rt_sigreturn restorer for the handler, too.
 */
__asm__(".pushsection mmrt,\"ax\",@progbits\n"
        ".globl rt_touch_one\n.hidden rt_touch_one\n.type rt_touch_one,@function\n"
        "rt_touch_one:\n"
        "  xor %eax, %eax\n"
        "  test %esi, %esi\n"
        "  jz 1f\n"
        ".globl rt_touch_w\n.hidden rt_touch_w\n"
        "rt_touch_w:\n"
        "  movb $1, (%rdi)\n"
        "  ret\n"
        "1:\n"
        ".globl rt_touch_r\n.hidden rt_touch_r\n"
        "rt_touch_r:\n"
        "  movb (%rdi), %cl\n"
        "  ret\n"
        ".globl rt_touch_fix\n.hidden rt_touch_fix\n"
        "rt_touch_fix:\n"
        "  ret\n"
        ".globl rt_restorer\n.hidden rt_restorer\n"
        "rt_restorer:\n"
        "  mov $15, %eax\n"
        "  syscall\n"
        "  ud2\n"
        ".popsection\n");

extern long rt_touch_one(long addr, int write) __attribute__((visibility("hidden")));
extern char rt_touch_w[] __attribute__((visibility("hidden")));
extern char rt_touch_r[] __attribute__((visibility("hidden")));
extern char rt_touch_fix[] __attribute__((visibility("hidden")));
extern char rt_restorer[] __attribute__((visibility("hidden")));

static RT void rt_on_fault(int sig, void *info, void *ucv)
{
    ucontext_t *uc = ucv;
    greg_t rip = uc->uc_mcontext.gregs[REG_RIP];
    (void)info;
    if (rip == (greg_t)rt_touch_w || rip == (greg_t)rt_touch_r) {
        uc->uc_mcontext.gregs[REG_RAX] = sig;
        uc->uc_mcontext.gregs[REG_RIP] = (greg_t)rt_touch_fix;
        return;
    }
    rt_sys(SYS_exit_group, 128 + sig, 0, 0, 0, 0, 0);
}

struct rt_ksigaction {
    long handler;
    unsigned long flags;
    long restorer;
    unsigned long mask;
};

static RT void rt_install_handlers(void)
{
    struct rt_ksigaction sa;
    sa.handler = (long)rt_on_fault;
    sa.flags = SA_SIGINFO | RT_SA_RESTORER | SA_NODEFER;
    sa.restorer = (long)rt_restorer;
    sa.mask = 0;
    rt_sys(SYS_rt_sigaction, SIGSEGV, (long)&sa, 0, 8, 0, 0);
    rt_sys(SYS_rt_sigaction, SIGBUS, (long)&sa, 0, 8, 0, 0);
}

static RT long rt_read_full(long fd, char *p, long n)
{
    long done = 0;
    while (done < n) {
        long r = rt_sys(SYS_read, fd, (long)(p + done), n - done, 0, 0, 0);
        if (r == -EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += r;
    }
    return done;
}

static RT void rt_loop(struct rt_slot *s);

/* Child side of OP_FORK: runs on the child's own slot stack. */
static RT void rt_child_start(struct rt_slot *s)
{
    rt_loop(s);
    rt_sys(SYS_exit_group, 0, 0, 0, 0, 0, 0);
}

/*
 * fork() whose child switches to another stack before it touches memory: parent and child share
 * the hugetlb region (MAP_SHARED), so the child must never write the parent's stack.
 */
static RT long rt_fork_into(struct rt_slot *child)
{
    register long sp __asm__("r12") = (long)child + SLOT_SIZE;
    register long arg __asm__("r13") = (long)child;
    register long fn __asm__("r14") = (long)rt_child_start;
    long ret;
    __asm__ volatile("mov $57, %%eax\n\t"
                     "syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov %%r12, %%rsp\n\t"
                     "mov %%r13, %%rdi\n\t"
                     "call *%%r14\n\t"
                     "ud2\n"
                     "1:\n"
                     : "=a"(ret)
                     : "r"(sp), "r"(arg), "r"(fn)
                     : "rcx", "r11", "memory");
    return ret;
}

struct rt_caphdr {
    unsigned int version;
    int pid;
};

struct rt_capdata {
    unsigned int effective, permitted, inheritable;
};

static RT long rt_dropcap(long cap)
{
    struct rt_caphdr hdr;
    struct rt_capdata data[2];
    long r;
    hdr.version = 0x20080522; /* _LINUX_CAPABILITY_VERSION_3 */
    hdr.pid = 0;
    r = rt_sys(SYS_capget, (long)&hdr, (long)data, 0, 0, 0, 0);
    if (r < 0)
        return r;
    data[cap / 32].effective &= ~(1u << (cap % 32));
    data[cap / 32].permitted &= ~(1u << (cap % 32));
    data[cap / 32].inheritable &= ~(1u << (cap % 32));
    return rt_sys(SYS_capset, (long)&hdr, (long)data, 0, 0, 0, 0);
}

static RT long rt_rlimit(long soft, long hard)
{
    unsigned long cur[2], want[2];
    long r = rt_sys(SYS_prlimit64, 0, RLIMIT_MEMLOCK, 0, (long)cur, 0, 0);
    if (r < 0)
        return r;
    want[0] = soft == -2 ? cur[0] : (unsigned long)soft;
    want[1] = hard == -2 ? cur[1] : (unsigned long)hard;
    return rt_sys(SYS_prlimit64, 0, RLIMIT_MEMLOCK, (long)want, 0, 0, 0);
}

static RT void rt_exec(struct rt_slot *s, struct rt_cmd *c, struct rt_rep *rep)
{
    long *a = c->a;
    long i;
    rep->ret = 0;
    rep->aux = 0;
    if (c->op == OP_SYS) {
        rep->ret = rt_sys(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
    } else if (c->op == OP_TOUCH) {
        for (i = 0; i < a[1]; i++) {
            long sig = rt_touch_one(a[0] + i * PAGE, (int)a[2]);
            if (sig) {
                rep->ret = sig;
                break;
            }
        }
        rep->aux = i;
    } else if (c->op == OP_FORK) {
        struct rt_slot *child = (struct rt_slot *)(s->base + CODE_SIZE + a[0] * SLOT_SIZE);
        rep->ret = rt_fork_into(child);
    } else if (c->op == OP_EXIT) {
        rt_sys(SYS_exit_group, 0, 0, 0, 0, 0, 0);
    } else if (c->op == OP_RLIMIT) {
        rep->ret = rt_rlimit(a[0], a[1]);
    } else if (c->op == OP_DROPCAP) {
        rep->ret = rt_dropcap(a[0]);
    } else if (c->op == OP_SHMNEW) {
        long id = rt_sys(SYS_shmget, 0 /* IPC_PRIVATE */, a[1], 01000 | 0600, 0, 0, 0);
        rep->ret = id;
        if (id >= 0) {
            rep->aux = rt_sys(SYS_shmat, id, a[0], 0, 0, 0, 0);
            /* destroyed when the last attacher detaches; SHM_LOCK still works on the id */
            rt_sys(SYS_shmctl, id, 0 /* IPC_RMID */, 0, 0, 0, 0);
        }
    } else if (c->op == OP_DRAIN) {
        /* VM_LOCKED on, then off, on a never-touched page: each flag change runs
         * mlock_vma_pages_range(), which calls lru_add_drain() before and after its (empty)
         * page walk; MLOCK_ONFAULT skips the populate, so no page is ever faulted in. */
        rep->ret = rt_sys(SYS_mlock2, a[0], PAGE, 1 /* MLOCK_ONFAULT */, 0, 0, 0);
        rep->aux = rt_sys(SYS_munlock, a[0], PAGE, 0, 0, 0, 0);
    }
}

static RT void rt_loop(struct rt_slot *s)
{
    struct rt_cmd c;
    struct rt_rep rep;
    for (;;) {
        if (rt_read_full(s->cmd_fd, (char *)&c, sizeof c) < 0)
            return; /* coordinator gone */
        rt_exec(s, &c, &rep);
        rt_sys(SYS_write, s->rep_fd, (long)&rep, sizeof rep, 0, 0, 0);
    }
}

/* Entry of a root process: drop every non-runtime mapping, then serve commands. */
static RT void rt_enter(struct rt_slot *s)
{
    long i;
    for (i = 0; i < s->nranges; i++)
        rt_sys(SYS_munmap, s->ranges[i][0], s->ranges[i][1] - s->ranges[i][0], 0, 0, 0, 0);
    rt_install_handlers();
    rt_loop(s);
    rt_sys(SYS_exit_group, 0, 0, 0, 0, 0, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* coordinator (ordinary C, runs on the driver cpu)                                           */
/* ------------------------------------------------------------------------------------------ */

extern char __start_mmrt[], __stop_mmrt[];

static char *region;
static int nslots;
static int scen_cpu;
static int cmd_w[MAX_SLOTS], rep_r[MAX_SLOTS];
static pid_t pids[MAX_SLOTS];
static int pidfds[MAX_SLOTS];
static char *scratch; /* coordinator's own drain page */

static void die(const char *msg)
{
    fprintf(stderr, "scenario_exec: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static struct rt_slot *slot_at(int i)
{
    return (struct rt_slot *)(region + CODE_SIZE + (long)i * SLOT_SIZE);
}

static void *rt_addr(void *fn)
{
    return region + ((char *)fn - __start_mmrt);
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        die("sched_setaffinity");
}

static int is_special(const char *line)
{
    return strstr(line, "[vdso]") || strstr(line, "[vvar]") || strstr(line, "[vvar_vclock]") ||
           strstr(line, "[vsyscall]");
}

/*
 * glibc registers an rseq area inside the thread's TLS block; the kernel writes it on every
 * return to user space and kills the process with SIGSEGV once it is unmapped.  Unregister it
 * (the driver also starts us with glibc.pthread.rseq=0, which makes this a no-op).
 */
static void unregister_rseq(void)
{
#ifdef HAVE_GLIBC_RSEQ
    void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
    if (__rseq_size == 0)
        return;
    if (syscall(SYS_rseq, area, 32, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) != 0 &&
        syscall(SYS_rseq, area, __rseq_size, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) != 0)
        die("rseq unregister");
#endif
}

/* Child half of "S": runs in the forked copy of the coordinator, then enters the runtime. */
static void become_scenario_process(int slot, int thp)
{
    struct rt_slot *s = slot_at(slot);
    struct rlimit rl = {8L << 20, 8L << 20};
    char line[512];
    FILE *maps;
    int fd;

    pin(scen_cpu);
    if (!thp && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0)
        die("PR_SET_THP_DISABLE");
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        die("PR_SET_PDEATHSIG");
    if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0)
        die("setrlimit(RLIMIT_MEMLOCK, 8 MiB)");
    maps = fopen("/proc/self/maps", "r");
    if (!maps)
        die("/proc/self/maps");
    s->nranges = 0;
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2 || is_special(line))
            continue;
        if (lo == (unsigned long)region)
            continue;
        if (s->nranges == MAX_RANGES) {
            errno = E2BIG;
            die("too many mappings");
        }
        s->ranges[s->nranges][0] = (long)lo;
        s->ranges[s->nranges][1] = (long)hi;
        s->nranges++;
    }
    fclose(maps);
    unregister_rseq();
    /* keep only the runtime's pipe ends and the tmpfs files; stdio belongs to the driver */
    for (fd = 0; fd < 3; fd++)
        close(fd);
    for (int i = 0; i < nslots; i++) {
        close(cmd_w[i]);
        close(rep_r[i]);
        if (pidfds[i] >= 0)
            close(pidfds[i]);
    }
    {
        register long sp __asm__("r12") = (long)s + SLOT_SIZE;
        register long arg __asm__("r13") = (long)s;
        register long fn __asm__("r14") = (long)rt_addr((void *)rt_enter);
        __asm__ volatile("mov %%r12, %%rsp\n\t"
                         "mov %%r13, %%rdi\n\t"
                         "call *%%r14\n\t"
                         "ud2\n" ::"r"(sp),
                         "r"(arg), "r"(fn)
                         : "memory");
    }
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Wait until SLOT's process has exited (its mm is torn down before it becomes a zombie). */
static int wait_gone(int slot, int timeout_ms)
{
    struct pollfd p = {pidfds[slot], POLLIN, 0};
    if (pidfds[slot] < 0)
        return 0;
    if (poll(&p, 1, timeout_ms) != 1)
        return -1;
    close(pidfds[slot]);
    pidfds[slot] = -1;
    return 0;
}

static void track(int slot, pid_t pid)
{
    pids[slot] = pid;
    pidfds[slot] = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfds[slot] < 0)
        die("pidfd_open");
}

/* Send one runtime command; returns 0 with *rep filled, -1 if the process died. */
static int send_cmd(int slot, struct rt_cmd *c, struct rt_rep *rep, int want_reply)
{
    struct pollfd p[2];
    char *buf = (char *)rep;
    size_t got = 0;
    if (write(cmd_w[slot], c, sizeof *c) != (ssize_t)sizeof *c)
        return -1;
    if (!want_reply)
        return 0;
    p[0].fd = rep_r[slot];
    p[0].events = POLLIN;
    p[1].fd = pidfds[slot];
    p[1].events = POLLIN;
    while (got < sizeof *rep) {
        p[0].revents = p[1].revents = 0;
        if (poll(p, 2, 60000) <= 0)
            return -1;
        if (p[0].revents & POLLIN) {
            ssize_t r = read(rep_r[slot], buf + got, sizeof *rep - got);
            if (r <= 0)
                return -1;
            got += (size_t)r;
        } else if (p[1].revents) {
            return -1;
        }
    }
    return 0;
}

static void drain_self(void)
{
    /* same trick as OP_DRAIN, on the coordinator's own cpu */
    if (syscall(SYS_mlock2, scratch, PAGE, 1) != 0 || munlock(scratch, PAGE) != 0)
        die("local drain");
}

static void cmd_file(long pages, int prefill)
{
    char path[] = "/dev/shm/mmsvc-conformance-XXXXXX";
    static char buf[PAGE];
    int fd = mkstemp(path);
    if (fd < 0)
        die("mkstemp in /dev/shm");
    unlink(path);
    if (ftruncate(fd, pages * PAGE) != 0)
        die("ftruncate");
    if (prefill) {
        memset(buf, 'x', sizeof buf);
        for (long i = 0; i < pages; i++)
            if (pwrite(fd, buf, PAGE, i * PAGE) != PAGE)
                die("prefill");
    }
    reply("ok %d", fd);
}

/*
 * Observe a file's page-cache pages without perturbing them: map it read-only here (driver cpu,
 * never VM_LOCKED), ask mincore() which pages are cached, read-fault only those (a read fault of a
 * cached page allocates nothing), read pfns from pagemap and flags from kpageflags, unmap.
 * MADV_RANDOM clears the VMA's recency hint so the unmap does not mark the pages accessed.
 */
static void cmd_observe(int fd, long pages)
{
    long len = pages * PAGE;
    unsigned char *vec = calloc((size_t)pages, 1);
    uint64_t *pm = calloc((size_t)pages, sizeof *pm);
    char *m;
    int pmfd, kfd;
    if (!vec || !pm)
        die("calloc");
    m = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        die("observe mmap");
    if (madvise(m, (size_t)len, MADV_RANDOM) != 0 || mincore(m, (size_t)len, vec) != 0)
        die("observe madvise/mincore");
    for (long i = 0; i < pages; i++)
        if (vec[i] & 1)
            (void)*(volatile char *)(m + i * PAGE);
    pmfd = open("/proc/self/pagemap", O_RDONLY);
    kfd = open("/proc/kpageflags", O_RDONLY);
    if (pmfd < 0 || kfd < 0)
        die("open pagemap/kpageflags");
    if (pread(pmfd, pm, (size_t)pages * 8, (off_t)((uintptr_t)m / PAGE) * 8) != pages * 8)
        die("read pagemap");
    printf("ok");
    for (long i = 0; i < pages; i++) {
        uint64_t pfn = pm[i] & ((1ULL << 55) - 1), flags = 0;
        if (!(vec[i] & 1) || !(pm[i] >> 63) || pfn == 0) {
            printf(" -");
            continue;
        }
        if (pread(kfd, &flags, 8, (off_t)(pfn * 8)) != 8)
            die("read kpageflags");
        printf(" %llx", (unsigned long long)flags);
    }
    reply("%s", "");
    close(pmfd);
    close(kfd);
    munmap(m, (size_t)len);
    free(vec);
    free(pm);
}

static int drain_scenario_cpu(void)
{
    struct rt_cmd c = {OP_DRAIN, {DRAIN_SCRATCH}};
    struct rt_rep rep;
    if (send_cmd(0, &c, &rep, 1) != 0 || rep.ret != 0 || rep.aux != 0)
        return -1;
    return 0;
}

static void cmd_quit(void)
{
    /* scenario processes first, then drain what their teardown queued, then the drainer */
    for (int i = 1; i < nslots; i++)
        if (pidfds[i] >= 0) {
            kill(pids[i], SIGKILL);
            wait_gone(i, 10000);
        }
    if (pidfds[0] >= 0) {
        drain_scenario_cpu();
        kill(pids[0], SIGKILL);
        wait_gone(0, 10000);
    }
    while (waitpid(-1, NULL, __WALL) > 0 || errno == EINTR)
        ;
    reply("ok");
    exit(0);
}

static void serve(void)
{
    static char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        long v[9] = {0};
        char op = line[0];
        int n = sscanf(line + 1, "%ld %ld %ld %ld %ld %ld %ld %ld %ld", &v[0], &v[1], &v[2], &v[3],
                       &v[4], &v[5], &v[6], &v[7], &v[8]);
        if (op == 'F' && n == 2) {
            cmd_file(v[0], (int)v[1]);
        } else if (op == 'R') {
            if (drain_scenario_cpu() != 0)
                reply("err drain failed");
            else
                reply("ok");
        } else if (op == 'D') {
            drain_self();
            reply("ok");
        } else if (op == 'S' && (n == 1 || n == 2) && v[0] >= 0 && v[0] < nslots) {
            pid_t pid;
            fflush(stdout);
            pid = fork();
            if (pid < 0)
                die("fork");
            if (pid == 0)
                become_scenario_process((int)v[0], n == 2 && v[1] == 1);
            track((int)v[0], pid);
            {
                /* answer only once the child serves commands from the runtime */
                struct rt_cmd c = {OP_PING, {0}};
                struct rt_rep rep;
                if (send_cmd((int)v[0], &c, &rep, 1) != 0) {
                    reply("err spawned process died");
                    continue;
                }
            }
            if (v[0] == 0) {
                struct rt_cmd c = {OP_SYS,
                                   {SYS_mmap, DRAIN_SCRATCH, PAGE, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0}};
                struct rt_rep rep;
                if (send_cmd(0, &c, &rep, 1) != 0 || rep.ret != DRAIN_SCRATCH) {
                    reply("err drainer scratch mapping failed");
                    continue;
                }
            }
            reply("ok %d", pid);
        } else if (op == 'P' && n == 2 && v[0] >= 0 && v[0] < nslots) {
            track((int)v[0], (pid_t)v[1]);
            reply("ok");
        } else if (op == 'C' && n >= 2 && v[0] >= 0 && v[0] < nslots) {
            struct rt_cmd c;
            struct rt_rep rep;
            c.op = v[1];
            for (int i = 0; i < 7; i++)
                c.a[i] = v[2 + i];
            if (send_cmd((int)v[0], &c, &rep, 1) != 0)
                reply("dead");
            else
                reply("ok %ld %ld", rep.ret, rep.aux);
        } else if (op == 'X' && n == 1 && v[0] >= 0 && v[0] < nslots) {
            struct rt_cmd c = {OP_EXIT, {0}};
            struct rt_rep rep;
            send_cmd((int)v[0], &c, &rep, 0);
            if (wait_gone((int)v[0], 60000) != 0)
                reply("err exit timeout");
            else
                reply("ok");
        } else if (op == 'O' && n == 2) {
            cmd_observe((int)v[0], v[1]);
        } else if (op == 'Q') {
            cmd_quit();
        } else {
            reply("err bad command");
        }
    }
    cmd_quit();
}

int main(int argc, char **argv)
{
    long code_len = __stop_mmrt - __start_mmrt;
    if (argc != 4) {
        fprintf(stderr, "usage: %s DRIVER_CPU SCENARIO_CPU NSLOTS\n", argv[0]);
        return 2;
    }
    scen_cpu = atoi(argv[2]);
    nslots = atoi(argv[3]);
    if (nslots < 1 || nslots > MAX_SLOTS) {
        fprintf(stderr, "scenario_exec: NSLOTS must be 1..%d\n", MAX_SLOTS);
        return 2;
    }
    if (code_len > CODE_SIZE) {
        fprintf(stderr, "scenario_exec: runtime code too large\n");
        return 2;
    }
    pin(atoi(argv[1]));
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0)
        die("PR_SET_CHILD_SUBREAPER");
    region = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC,
                  MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) {
        fprintf(stderr, "scenario_exec: no 2 MiB hugetlb page (raise vm.nr_overcommit_hugepages):"
                        " %s\n",
                strerror(errno));
        return 3;
    }
    memcpy(region, __start_mmrt, (size_t)code_len);
    scratch = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch == MAP_FAILED)
        die("scratch mmap");
    for (int i = 0; i < nslots; i++) {
        int c[2], r[2];
        struct rt_slot *s = slot_at(i);
        if (pipe2(c, O_CLOEXEC) != 0 || pipe2(r, O_CLOEXEC) != 0)
            die("pipe2");
        cmd_w[i] = c[1];
        rep_r[i] = r[0];
        pidfds[i] = -1;
        s->cmd_fd = c[0];
        s->rep_fd = r[1];
        s->base = (long)region;
        s->index = i;
        s->nranges = 0;
    }
    serve();
    return 0;
}
