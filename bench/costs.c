/*
 * Per-operation costs of free page reporting, measured on this host.
 *
 *   cc -O2 -o costs bench/costs.c -lpthread && ./costs
 *
 * Prints one JSON object: for each operation the median, in nanoseconds, of REPS timed runs.
 * bench/bench_costs.py builds and runs it and records the results with how each was taken.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MiB (1UL << 20)
#define REPS 41

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp);
	return v[n / 2];
}

static void touch(char *p, size_t len)
{
	for (size_t off = 0; off < len; off += 4096)
		p[off] = 1;
}

/* A 2 MiB-aligned anonymous mapping; hugepage says whether THP may back it. */
static char *anon(size_t len, int hugepage)
{
	char *raw = mmap(NULL, len + 2 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0);
	if (raw == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	char *p = (char *)(((uintptr_t)raw + 2 * MiB - 1) & ~(2 * MiB - 1));
	madvise(p, len, hugepage ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return p;
}

/* MADV_DONTNEED of a populated anonymous range (QEMU's discard for private guest RAM). */
static double discard_anon(size_t len, int hugepage)
{
	double t[REPS];
	char *p = anon(len, hugepage);
	for (int i = 0; i < REPS; i++) {
		touch(p, len);
		double t0 = now_ns();
		if (madvise(p, len, MADV_DONTNEED)) {
			perror("madvise");
			exit(1);
		}
		t[i] = now_ns() - t0;
	}
	return median(t, REPS);
}

/* FALLOC_FL_PUNCH_HOLE of a populated memfd range (QEMU's discard for shared guest RAM). */
static double discard_memfd(size_t len)
{
	double t[REPS];
	int fd = memfd_create("costs", 0);
	if (fd < 0 || ftruncate(fd, len)) {
		perror("memfd");
		exit(1);
	}
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		perror("mmap memfd");
		exit(1);
	}
	for (int i = 0; i < REPS; i++) {
		touch(p, len);
		double t0 = now_ns();
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, len)) {
			perror("fallocate");
			exit(1);
		}
		t[i] = now_ns() - t0;
	}
	munmap(p, len);
	close(fd);
	return median(t, REPS);
}

/* The first touch of discarded memory: per 4 KiB page without THP, per 2 MiB with it. */
static double refault(size_t unit, int hugepage)
{
	const size_t len = 64 * MiB;
	double t[REPS];
	char *p = anon(len, hugepage);
	for (int i = 0; i < REPS; i++) {
		touch(p, len);
		madvise(p, len, MADV_DONTNEED);
		double t0 = now_ns();
		for (size_t off = 0; off < len; off += unit)
			p[off] = 2;
		t[i] = (now_ns() - t0) / (len / unit);
	}
	return median(t, REPS);
}

/* will-it-scale page_fault1's loop: map 128 MiB, write every 4 KiB page, unmap. Per page. */
static double page_fault_loop(void)
{
	const size_t len = 128 * MiB;
	double t[REPS / 4 + 1];
	int n = REPS / 4 + 1;
	for (int i = 0; i < n; i++) {
		double t0 = now_ns();
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		madvise(p, len, MADV_NOHUGEPAGE);
		touch(p, len);
		munmap(p, len);
		t[i] = (now_ns() - t0) / (len / 4096);
	}
	return median(t, n);
}

/* One free-list entry visit: a dependent load of a struct page 64 KiB from the last, in a
 * random order over 256 MiB (heads of order-10 blocks are 1024 struct pages apart). */
static double list_visit(void)
{
	const size_t stride = 64 * 1024, n = 4096;
	char *mem = anon(n * stride, 0);
	size_t *order = malloc(n * sizeof(*order));
	for (size_t i = 0; i < n; i++)
		order[i] = i;
	srand(1);
	for (size_t i = n - 1; i > 0; i--) {
		size_t j = (size_t)rand() % (i + 1), x = order[i];
		order[i] = order[j];
		order[j] = x;
	}
	for (size_t i = 0; i < n; i++)
		*(char **)(mem + order[i] * stride) = mem + order[(i + 1) % n] * stride;
	double t[REPS];
	for (int r = 0; r < REPS; r++) {
		char *p = mem + order[0] * stride;
		double t0 = now_ns();
		for (size_t i = 0; i < 16 * n; i++)
			p = *(char **)p;
		t[r] = (now_ns() - t0) / (16 * n);
		if (!p)
			exit(1);
	}
	free(order);
	return median(t, REPS);
}

/* An uncontended lock round trip: a locked exchange and a release store (spin_lock's shape). */
static double lock_round_trip(void)
{
	static volatile int lock;
	const int n = 1000000;
	double t[REPS];
	for (int r = 0; r < REPS; r++) {
		double t0 = now_ns();
		for (int i = 0; i < n; i++) {
			while (__atomic_exchange_n(&lock, 1, __ATOMIC_ACQUIRE))
				;
			__atomic_store_n(&lock, 0, __ATOMIC_RELEASE);
		}
		t[r] = (now_ns() - t0) / n;
	}
	return median(t, REPS);
}

/* A thread woken through an eventfd and waking the caller back: QEMU's iothread picking up
 * a virtqueue kick (ioeventfd) and the completion. Per one-way wake-up. */
static int efd_a, efd_b;
static void *pong(void *arg)
{
	uint64_t v;
	for (;;) {
		if (read(efd_a, &v, 8) != 8)
			return arg;
		if (write(efd_b, &v, 8) != 8)
			return arg;
	}
}

static double eventfd_wakeup(void)
{
	pthread_t th;
	efd_a = eventfd(0, 0);
	efd_b = eventfd(0, 0);
	pthread_create(&th, NULL, pong, NULL);
	const int n = 2000;
	double t[REPS];
	uint64_t v = 1;
	for (int r = 0; r < REPS; r++) {
		double t0 = now_ns();
		for (int i = 0; i < n; i++) {
			if (write(efd_a, &v, 8) != 8 || read(efd_b, &v, 8) != 8)
				exit(1);
		}
		t[r] = (now_ns() - t0) / (2.0 * n);
	}
	return median(t, REPS);
}

/* A guest exit to the host and back: a one-vCPU KVM guest in real mode doing `out` in a loop,
 * each KVM_RUN returning on KVM_EXIT_IO (a heavyweight exit, to user space). -1: no KVM. */
static double kvm_exit(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return -1;
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return -1;
	const uint8_t code[] = {0xe6, 0x10, 0xeb, 0xfc}; /* out 0x10, al; jmp $-2 */
	uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	memcpy(mem, code, sizeof(code));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return -1;
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vcpu < 0 || size <= 0)
		return -1;
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs sregs;
	ioctl(vcpu, KVM_GET_SREGS, &sregs);
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	ioctl(vcpu, KVM_SET_SREGS, &sregs);
	struct kvm_regs regs = {.rip = 0x1000, .rflags = 0x2};
	ioctl(vcpu, KVM_SET_REGS, &regs);
	const int n = 20000;
	double t[REPS];
	for (int r = 0; r < REPS; r++) {
		double t0 = now_ns();
		for (int i = 0; i < n; i++) {
			if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO)
				return -1;
		}
		t[r] = (now_ns() - t0) / n;
	}
	return median(t, REPS);
}

int main(void)
{
	printf("{\n");
	printf("  \"discard_anon_2m_ns\": %.0f,\n", discard_anon(2 * MiB, 1));
	printf("  \"discard_anon_4m_ns\": %.0f,\n", discard_anon(4 * MiB, 1));
	printf("  \"discard_anon_2m_4k_pages_ns\": %.0f,\n", discard_anon(2 * MiB, 0));
	printf("  \"discard_memfd_2m_ns\": %.0f,\n", discard_memfd(2 * MiB));
	printf("  \"discard_memfd_4m_ns\": %.0f,\n", discard_memfd(4 * MiB));
	printf("  \"refault_4k_ns\": %.0f,\n", refault(4096, 0));
	printf("  \"refault_2m_ns\": %.0f,\n", refault(2 * MiB, 1));
	printf("  \"page_fault_loop_ns\": %.1f,\n", page_fault_loop());
	printf("  \"list_visit_ns\": %.2f,\n", list_visit());
	printf("  \"lock_round_trip_ns\": %.2f,\n", lock_round_trip());
	printf("  \"eventfd_wakeup_ns\": %.0f,\n", eventfd_wakeup());
	printf("  \"kvm_exit_ns\": %.0f\n", kvm_exit());
	printf("}\n");
	return 0;
}
