/* Bare-metal start of an lmc C bundle on an Arm M-profile board under qemu-system-arm (semihosting).
 *
 * Reset_Handler enables the FPU (and on Armv8.1-M the MVE unit: both are coprocessors 10 and 11 in CPACR)
 * before any C runs, so nothing the compiler emits can fault with NOCP; lmc_start then copies .data from
 * flash, zeroes .bss, paints the stack below the current stack pointer with STACK_PAINT, sets the stack
 * limit register where the architecture has one (Armv8-M: MSPLIM, a hardware check), opens the semihosting
 * handles and runs main(). The bundle's call to lmc_run is wrapped (-Wl,--wrap=lmc_run): SysTick, clocked
 * by the CPU clock, counts around it; under qemu -icount shift=0 one instruction is one nanosecond of virtual
 * time, so ticks * 1e9 / cpu_hz is the instructions the inference executed (to one tick).
 * Built with -DLMC_PROFILE_PERIOD=P, SysTick interrupts every P ticks inside lmc_run and records the interrupted
 * pc (up to LMC_PROFILE_SAMPLES, written to lmc_profile.bin): a sampling profile, each sample P ticks of
 * instructions (the handler's own few instructions per sample ride along).
 * Built with -DLMC_PROFILE_STEPS=N as well (the board module then compiles a copy of model.c that calls
 * lmc_board_step(i) where each of its N steps begins), the ticks of each step are counted exactly.
 * After main returns it writes lmc_board.txt (key value lines: exit code, stack bytes used — the depth of the
 * deepest word that is no longer the paint —, heap bytes used, SysTick ticks, MVFR0) and exits with main's code
 * (semihosting SYS_EXIT_EXTENDED: the code is qemu's exit status). A fault exits with LMC_FAULT_EXIT after
 * writing the fault's registers to the same file.
 *
 * Linker symbols (sections.ld): __data_load/__data_start/__data_end, __bss_start/__bss_end, end/__lmc_heap_limit
 * (the heap newlib's malloc grows into through _sbrk, here), __stack_limit/__stack_top.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define LMC_FAULT_EXIT 250
#define STACK_PAINT 0x5A17C0DEu

#define REG(addr) (*(volatile uint32_t *)(addr))
#define SCB_ICSR 0xE000ED04u
#define SCB_CPACR 0xE000ED88u
#define SCB_CFSR 0xE000ED28u
#define SCB_HFSR 0xE000ED2Cu
#define SCB_MMFAR 0xE000ED34u
#define SCB_BFAR 0xE000ED38u
#define MVFR0 0xE000EF40u
#define SYST_CSR 0xE000E010u
#define SYST_RVR 0xE000E014u
#define SYST_CVR 0xE000E018u
#ifdef LMC_PROFILE_PERIOD
#define SYST_RELOAD ((uint32_t)(LMC_PROFILE_PERIOD) - 1u)
#define LMC_PROFILE_SAMPLES 16384u
static uint32_t profile_pcs[LMC_PROFILE_SAMPLES];
static uint32_t profile_taken;              /* samples taken; those past LMC_PROFILE_SAMPLES are dropped */
#else
#define SYST_RELOAD 0x00FFFFFFu
#endif

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_limit[], __stack_top[];
extern char end[], __lmc_heap_limit[];

extern int main(void);
extern void initialise_monitor_handles(void);
int __real_lmc_run(const void *const *inputs, void *const *outputs);
int __wrap_lmc_run(const void *const *inputs, void *const *outputs);
void lmc_start(void) __attribute__((noreturn, used));
void Reset_Handler(void);
void SysTick_Handler(void);
void lmc_systick(const uint32_t *frame);
void lmc_fault(uint32_t which, const uint32_t *frame);
void Fault_Handler(void);

static volatile uint32_t systick_wraps;
static uint64_t run_ticks;
static uint32_t run_calls;
static char *heap_top;

/* The FPU (and MVE) must be on before the first floating-point or vector instruction; nothing else runs first. */
__attribute__((naked)) void Reset_Handler(void)
{
    __asm__ volatile(
        "ldr r0, =0xE000ED88\n"     /* CPACR */
        "ldr r1, [r0]\n"
        "orr r1, r1, #0x00F00000\n" /* CP10, CP11: full access */
        "str r1, [r0]\n"
        "dsb\n"
        "isb\n"
        "b lmc_start\n");
}

/* SysTick: one more wrap; profiled, the pc it interrupted (the stacked frame's seventh word). */
__attribute__((naked)) void SysTick_Handler(void)
{
    __asm__ volatile(
        "tst lr, #4\n"
        "ite eq\n"
        "mrseq r0, msp\n"
        "mrsne r0, psp\n"
        "b lmc_systick\n");
}

void lmc_systick(const uint32_t *frame)
{
    systick_wraps++;
#ifdef LMC_PROFILE_PERIOD
    if (profile_taken < LMC_PROFILE_SAMPLES)
        profile_pcs[profile_taken] = frame[6];
    profile_taken++;
#else
    (void)frame;
#endif
}

/* Every fault lands here with which = the exception number and the stacked frame. */
__attribute__((naked)) void Fault_Handler(void)
{
    __asm__ volatile(
        "tst lr, #4\n"
        "ite eq\n"
        "mrseq r1, msp\n"
        "mrsne r1, psp\n"
        "mrs r0, ipsr\n"
        "b lmc_fault\n");
}

typedef void (*vector_t)(void);
__attribute__((section(".vectors"), used)) static const vector_t vectors[16] = {
    (vector_t)(uintptr_t)__stack_top, /* initial main stack pointer */
    Reset_Handler,
    Fault_Handler,                     /* NMI */
    Fault_Handler,                     /* HardFault */
    Fault_Handler,                     /* MemManage */
    Fault_Handler,                     /* BusFault */
    Fault_Handler,                     /* UsageFault (Armv8-M: also the stack-limit check) */
    Fault_Handler,                     /* SecureFault */
    0, 0, 0,
    Fault_Handler,                     /* SVCall */
    Fault_Handler,                     /* DebugMonitor */
    0,
    Fault_Handler,                     /* PendSV */
    SysTick_Handler,
};

/* newlib's malloc (fopen's FILE and buffer) grows the heap [end, __lmc_heap_limit) through this; the top is the
 * heap's high-water mark. */
void *_sbrk(ptrdiff_t incr)
{
    char *prev;
    if (heap_top == NULL)
        heap_top = end;
    if (incr > __lmc_heap_limit - heap_top)
        return (void *)-1;
    prev = heap_top;
    heap_top += incr;
    return prev;
}

static void systick_start(void)
{
    systick_wraps = 0;
    REG(SYST_CSR) = 0;
    REG(SYST_RVR) = SYST_RELOAD;
    REG(SYST_CVR) = 0;
    REG(SYST_CSR) = 7; /* enable, interrupt on wrap, CPU clock */
}

/* Ticks since systick_start. The counter goes RELOAD, ..., 1, 0, RELOAD…, one value a tick; reaching 0 pends
 * the interrupt that counts the wrap. So with w wraps counted (the pending one included), the ticks are
 * w * (RELOAD + 1) + (RELOAD - value), except while the counter shows 0 after a wrap: w * (RELOAD + 1) - 1. */
static uint64_t systick_now(void)
{
    uint32_t wraps, value, pending;
    do {
        wraps = systick_wraps;
        pending = (REG(SCB_ICSR) >> 26) & 1u; /* PENDSTSET: a wrap not yet counted by the handler */
        value = REG(SYST_CVR);
    } while (wraps != systick_wraps);
    wraps += pending;
    if (value == 0) /* (before the first tick it shows the 0 systick_start wrote: no tick yet) */
        return wraps == 0 ? 0u : (uint64_t)wraps * (SYST_RELOAD + 1u) - 1u;
    return (uint64_t)wraps * (SYST_RELOAD + 1u) + (SYST_RELOAD - value);
}

static uint64_t systick_stop(void)
{
    uint64_t ticks = systick_now();
    REG(SYST_CSR) = 0;
    return ticks;
}

#ifdef LMC_PROFILE_STEPS
/* A profiled model.c calls lmc_board_step(i) where its step i begins: the ticks from there to the next mark
 * are step i's. [0] holds lmc_run's own before its first step, [i + 1] step i. */
void lmc_board_step(unsigned step);
static uint64_t step_ticks[LMC_PROFILE_STEPS + 1];
static uint32_t step_current;
static uint64_t step_mark;

void lmc_board_step(unsigned step)
{
    uint64_t now = systick_now();
    step_ticks[step_current] += now - step_mark;
    step_current = step < LMC_PROFILE_STEPS ? step + 1u : 0u;
    step_mark = now;
}
#endif

int __wrap_lmc_run(const void *const *inputs, void *const *outputs)
{
    int rc;
    uint64_t ticks;
#ifdef LMC_PROFILE_STEPS
    step_current = 0;
    step_mark = 0;
#endif
    systick_start();
    rc = __real_lmc_run(inputs, outputs);
    ticks = systick_stop();
#ifdef LMC_PROFILE_STEPS
    step_ticks[step_current] += ticks - step_mark;
#endif
    run_ticks += ticks;
    run_calls++;
    return rc;
}

static uint32_t stack_used(void)
{
    const volatile uint32_t *p = __stack_limit;
    while (p < __stack_top && *p == STACK_PAINT)
        p++;
    return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)p);
}

/* stack: measured by the caller before this function's own calls (fopen, fprintf) deepen the stack */
static void report(int code, uint32_t stack, const char *fault)
{
    FILE *f = fopen("lmc_board.txt", "w");
    if (f == NULL)
        return;
    fprintf(f, "exit %d\n", code);
    fprintf(f, "stack_used %lu\n", (unsigned long)stack);
    fprintf(f, "heap_used %lu\n", (unsigned long)(heap_top == NULL ? 0u : (uintptr_t)(heap_top - end)));
    fprintf(f, "ticks_hi %lu\nticks_lo %lu\n", (unsigned long)(run_ticks >> 32), (unsigned long)(run_ticks & 0xFFFFFFFFu));
    fprintf(f, "calls %lu\n", (unsigned long)run_calls);
    fprintf(f, "mvfr0 0x%08lx\n", (unsigned long)REG(MVFR0));
#ifdef LMC_PROFILE_PERIOD
    fprintf(f, "profile_period %lu\nprofile_taken %lu\n", (unsigned long)(SYST_RELOAD + 1u),
            (unsigned long)profile_taken);
#endif
#ifdef LMC_PROFILE_STEPS
    {
        unsigned i;
        for (i = 0; i <= LMC_PROFILE_STEPS; i++)
            fprintf(f, "step%u 0x%08lx%08lx\n", i, (unsigned long)(step_ticks[i] >> 32),
                    (unsigned long)(step_ticks[i] & 0xFFFFFFFFu));
    }
#endif
    if (fault != NULL)
        fputs(fault, f);
    fclose(f);
#ifdef LMC_PROFILE_PERIOD
    f = fopen("lmc_profile.bin", "wb");
    if (f != NULL) {
        fwrite(profile_pcs, 4, profile_taken < LMC_PROFILE_SAMPLES ? profile_taken : LMC_PROFILE_SAMPLES, f);
        fclose(f);
    }
#endif
}

void lmc_fault(uint32_t which, const uint32_t *frame)
{
    char text[160];
    uint32_t stack = stack_used();
    snprintf(text, sizeof text, "fault %lu\npc 0x%08lx\ncfsr 0x%08lx\nhfsr 0x%08lx\nmmfar 0x%08lx\nbfar 0x%08lx\n",
             (unsigned long)(which & 0x1FFu), (unsigned long)frame[6], (unsigned long)REG(SCB_CFSR),
             (unsigned long)REG(SCB_HFSR), (unsigned long)REG(SCB_MMFAR), (unsigned long)REG(SCB_BFAR));
    report(LMC_FAULT_EXIT, stack, text);
    _Exit(LMC_FAULT_EXIT);
}

void lmc_start(void)
{
    uint32_t *src = __data_load, *dst;
    volatile uint32_t *p;
    uintptr_t sp;
    int code;

    for (dst = __data_start; dst < __data_end;)
        *dst++ = *src++;
    for (p = __bss_start; p < (volatile uint32_t *)__bss_end;)
        *p++ = 0;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (p = __stack_limit; (uintptr_t)p < sp;)
        *p++ = STACK_PAINT;
#if defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8_1M_MAIN__)
    __asm__ volatile("msr msplim, %0" : : "r"(__stack_limit));
#endif
    initialise_monitor_handles();
    code = main();
    report(code, stack_used(), NULL);
    exit(code);
}
