/* cpuid-avx2.c: run a program natively on this x86-64 CPU while it sees the CPUID of an
 * x86 CPU with AVX2 and FMA and without AVX-512, VNNI (AVX-512 VNNI, AVX-VNNI, AVX-VNNI-INT8)
 * or AMX: a Haswell's vector features. Built and preloaded by tools/with-avx2-cpuid.sh.
 *
 * Why: onnxruntime (MLAS) and XNNPACK pick their int8 and fp32 kernels from CPUID once, when
 * they start. Under this mask they pick the kernels an AVX2-only x86 runs, and those kernels
 * run at native speed on this core, so they can be timed (qemu-x86_64 -cpu Haswell runs the
 * same kernels, but emulated timings mean nothing). What it does not change: this core's
 * micro-architecture (its caches, and how many AVX2 instructions of each kind it issues per
 * cycle), so a ratio measured under it is this core running AVX2 code, not an AVX2-only CPU.
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0); /proc/cpuinfo flag
 * cpuid_fault: Intel since Ivy Bridge, AMD Zen 5, and many virtual machines) makes every CPUID
 * instruction of this process raise SIGSEGV. The handler below executes the real CPUID (with
 * faulting off for that instant), clears the features above from leaf 7 and writes the result
 * into the faulting thread's registers. The setting is per thread and inherited by threads
 * and children created later; execve resets it, which is why the wrapper preloads this
 * library into every program it starts. The dynamic loader and glibc read CPUID before this
 * library's constructor: their string functions may still use AVX-512 (the wrapper sets
 * GLIBC_TUNABLES to turn those off too).
 *
 * A program that installs its own SIGSEGV handler with sigaction() (Python's faulthandler,
 * pytest) keeps working: sigaction() is intercepted for SIGSEGV, the program's handler is
 * stored, and every SIGSEGV that is not a trapped CPUID goes to it (or to the default action,
 * a crash, as without this library). glibc's signal(), bsd_signal() and sysv_signal() do not
 * go through the sigaction() symbol, so they are intercepted the same way: gcc's cc1 sets its
 * crash handler with signal(SIGSEGV, ...), took the CPUID traps itself and stopped with
 * "internal compiler error: Segmentation fault" (a C compiler run under the mask: the test
 * suite's C decoder). sigset() is not intercepted (obsolete; nothing here uses it).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

#define BIT(n) (1u << (n))

static long trapped;                  /* CPUID instructions emulated (CPUID_AVX2_COUNT=1 prints it) */
static struct sigaction program_action; /* what the program asked for SIGSEGV (SIG_DFL at first) */
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, GFNI, VAES, VPCLMULQDQ, AVX512_VNNI, BITALG, VPOPCNTDQ */
        *c &= ~(BIT(1) | BIT(6) | BIT(8) | BIT(9) | BIT(10) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX_VNNI, AVX512_BF16, AVX_IFMA; EDX: AVX_VNNI_INT8, AVX_NE_CONVERT,
         * AVX_VNNI_INT16, AVX10 */
        *a &= ~(BIT(4) | BIT(5) | BIT(23));
        *d &= ~(BIT(4) | BIT(5) | BIT(10) | BIT(19));
    } else if (leaf == 0x24) {  /* AVX10 converged vector ISA leaf */
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count(leaf, sub, a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        mask(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
        return;
    }
    /* Not ours: what the program asked for, or the default action (the fault repeats). A
     * SIGSEGV sent by raise() or kill (si_code <= 0) does not repeat: ignored where the program
     * ignores it, else raised again with the default action (it was swallowed). */
    int sent = si->si_code <= 0;
    if (sent && !(program_action.sa_flags & SA_SIGINFO) && program_action.sa_handler == SIG_IGN)
        return;
    if (program_action.sa_flags & SA_SIGINFO) {
        if (program_action.sa_sigaction) {
            program_action.sa_sigaction(sig, si, ctx);
            return;
        }
    } else if (program_action.sa_handler != SIG_DFL && program_action.sa_handler != SIG_IGN) {
        program_action.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &dfl, NULL);
    if (sent)
        raise(SIGSEGV);
}

int sigaction(int signum, const struct sigaction *act, struct sigaction *oldact) {
    if (!real_sigaction)
        real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (signum != SIGSEGV)
        return real_sigaction(signum, act, oldact);
    if (oldact)
        *oldact = program_action;
    if (act)
        program_action = *act;
    return 0;
}

static sighandler_t set_segv_handler(sighandler_t handler, int flags) {
    sighandler_t old = (program_action.sa_flags & SA_SIGINFO) ? (sighandler_t)program_action.sa_sigaction
                                                               : program_action.sa_handler;
    memset(&program_action, 0, sizeof program_action);
    program_action.sa_handler = handler;
    program_action.sa_flags = flags;
    return old;
}

static sighandler_t real_signal_call(const char *name, int signum, sighandler_t handler) {
    sighandler_t (*real)(int, sighandler_t) = (sighandler_t (*)(int, sighandler_t))dlsym(RTLD_NEXT, name);
    return real ? real(signum, handler) : SIG_ERR;
}

/* BSD semantics, as glibc's signal() and bsd_signal(): the handler stays, calls restart. */
sighandler_t signal(int signum, sighandler_t handler) {
    return signum == SIGSEGV ? set_segv_handler(handler, SA_RESTART) : real_signal_call("signal", signum, handler);
}

sighandler_t bsd_signal(int signum, sighandler_t handler) {
    return signum == SIGSEGV ? set_segv_handler(handler, SA_RESTART) : real_signal_call("bsd_signal", signum, handler);
}

/* System V semantics: the handler is reset to the default once it runs (SA_RESETHAND is not
 * acted on here: the stored handler stays, which only matters for a second real fault). */
sighandler_t sysv_signal(int signum, sighandler_t handler) {
    return signum == SIGSEGV ? set_segv_handler(handler, SA_RESETHAND | SA_NODEFER)
                             : real_signal_call("sysv_signal", signum, handler);
}

__attribute__((constructor)) static void start(void) {
    real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    memset(&program_action, 0, sizeof program_action);
    program_action.sa_handler = SIG_DFL;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpuid-avx2: this kernel or CPU cannot make CPUID fault (arch_prctl ARCH_SET_CPUID)");
        _exit(2);
    }
}

__attribute__((destructor)) static void stop(void) {
    if (getenv("CPUID_AVX2_COUNT"))
        fprintf(stderr, "cpuid-avx2: %ld CPUID instructions answered with AVX2-only features\n", trapped);
}
