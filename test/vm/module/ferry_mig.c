// SPDX-License-Identifier: GPL-2.0
/*
 * ferry_mig - an emulated mdev VFIO device that implements VFIO live
 * migration (protocol v2): STOP_COPY, optionally P2P and, on Linux 6.2 and
 * later, PRE_COPY with VFIO_MIG_GET_PRECOPY_INFO and MIG_DATA_SIZE.
 *
 * It exists so that Ferry's Linux backend (pkg/vfio) can be tested against
 * the kernel's real VFIO core: the container/group path, the
 * VFIO_DEVICE_FEATURE ioctls, the kernel's own state walker
 * (vfio_mig_get_next_state) and real data_fd files. One source builds on
 * Debian's 6.1 and 6.12 kernels (the only ones it is built and tested on);
 * LINUX_VERSION_CODE guards the API differences.
 *
 * Device model
 *   Each instance has a state of state_size bytes (module parameter, read
 *   when the instance is created), cut into blocks of FM_BLOCK bytes (the
 *   last may be shorter). Each block has a generation; its content is a
 *   pure function of the instance's 64-bit seed, the block's generation and
 *   the byte offset (splitmix64 words). A new instance's seed is derived
 *   from its UUID and every generation is 0: every instance has different,
 *   reproducible content. While the device runs (RUNNING, RUNNING_P2P,
 *   PRE_COPY, PRE_COPY_P2P) it rewrites blocks at dirty_rate bytes per
 *   second (a sysfs attribute, default 0): each rewrite gives one
 *   pseudo-randomly chosen block a new generation. The rewrites are
 *   computed lazily from the time elapsed whenever the state is looked at,
 *   so no timer runs. In STOP, STOP_COPY and RESUMING nothing changes.
 *
 *   A reset (VFIO_DEVICE_RESET, or the close of the device's last fd, as
 *   vfio-pci resets on close) ends any data session, returns the device to
 *   RUNNING and restores its power-on content: a loaded state is discarded.
 *
 * Migration stream (what a saving data_fd yields)
 *   A 64-byte header (struct fm_header, little endian), then records: a
 *   16-byte struct fm_rec and, for a data record, the content of one whole
 *   block at the generation the record names. The first pass (the "initial
 *   data") sends every block in order. After it come the blocks rewritten
 *   since they were last sent; a block may be sent many times, later
 *   records overwrite earlier ones. In STOP_COPY, once nothing is left, an
 *   end record carries a digest of the final image (the seed and every
 *   block's generation when STOP_COPY began), then read() returns 0.
 *   In PRE_COPY a read that finds nothing left is the temporary end of the
 *   stream: ENOMSG.
 *
 *   A destination (RESUMING) checks every byte written to it as it
 *   arrives, and RESUMING->STOP fails with EINVAL (the device stays in
 *   RESUMING) unless the header is valid and of a compatible instance
 *   (same size and block size), every record is well formed, every data
 *   byte matched, the end record arrived, every block arrived and the
 *   digest of what it holds is the end record's: it verifies the final
 *   image the source held, not the first pass. Bytes after the end record
 *   are refused (ENOMEM). On success the instance adopts the source's seed
 *   and generations: its state is now the source's.
 *
 * PRE_COPY (types with VFIO_MIGRATION_PRE_COPY)
 *   RUNNING -> PRE_COPY (and RUNNING_P2P -> PRE_COPY_P2P) opens the saving
 *   data_fd; PRE_COPY(_P2P) -> STOP_COPY keeps it (the core returns no new
 *   fd) and the rest of the stream follows on it. STOP_COPY -> PRE_COPY and
 *   PRE_COPY_P2P are refused with EINVAL before the kernel's walker sees
 *   them. VFIO_MIG_GET_PRECOPY_INFO on the data_fd reports initial_bytes
 *   (what is left of the first pass) and dirty_bytes (the rewritten blocks
 *   not yet sent again), both exact: their sum is what reads would return
 *   now; in any other state it is EINVAL, on an ended session ENODEV.
 *   MIG_DATA_SIZE reports what an immediate STOP_COPY would still return:
 *   the rest of the live session, or a whole stream when there is none.
 *
 * sysfs (in /sys/bus/mdev/devices/<uuid>/migration/)
 *   state         current migration state by name (RUNNING, STOP, ...)
 *   seed          seed of the current state content (hex)
 *   digest        digest of the current content: seed and generations (hex)
 *   size          state payload size in bytes
 *   block_size    bytes per block (the last block may be shorter)
 *   flags         migration flags (1 STOP_COPY, 2 P2P, 4 PRE_COPY)
 *   trace         arcs the last VFIO_DEVICE_FEATURE SET walked, as
 *                 "from>to" state numbers, then "= errno" (0 on success)
 *   corrupt       stream byte offset that the next save streams flip, or
 *                 -1 (default, off); write -1 to turn it off again
 *   last_error    why the last RESUMING->STOP failed (empty when it did not)
 *   inject_error  write 1 to put the device in ERROR (left only by reset)
 *   dirty_rate    bytes per second rewritten while the device runs
 *   dirty         write a block index: that block is rewritten now (only
 *                 while the device runs, else EBUSY)
 *   rewrites      block rewrites since the instance was created
 *   saved         the last save session: "digest=D records=N bytes=N",
 *                 D being the digest when STOP_COPY began (0 before)
 *   loaded        the last successful load: "digest=D records=N bytes=N
 *                 from=UUID", or empty; both survive resets
 *
 * mdev types (in /sys/class/mdev_bus/ferry_mig/mdev_supported_types/)
 *   ferry_mig-p2p            STOP_COPY | P2P
 *   ferry_mig-stopcopy       STOP_COPY
 *   ferry_mig-precopy        STOP_COPY | P2P | PRE_COPY   (6.2 and later)
 *   ferry_mig-precopy-nop2p  STOP_COPY | PRE_COPY         (6.2 and later)
 */

#include <linux/anon_inodes.h>
#include <linux/bitmap.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/math64.h>
#include <linux/mdev.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vfio.h>

/* PRE_COPY, VFIO_MIG_GET_PRECOPY_INFO and migration_get_data_size: 6.2. */
#define FM_PRECOPY (LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0))

#define FM_NAME "ferry_mig"
#define FM_MAGIC 0x47494d5952524546ULL /* "FERRYMIG" little endian */
#define FM_VERSION 2
#define FM_BLOCK (64 * 1024)
#define FM_MAX_INSTANCES 16
#define FM_TRACE_MAX 8
#define FM_MAX_RATE (1ULL << 40)	/* dirty_rate cap, bytes per second */
#define FM_EOF 1			/* fm_produce: the stream has ended */

static unsigned long state_size = 64UL << 20;
module_param(state_size, ulong, 0644);
MODULE_PARM_DESC(state_size,
		 "state payload bytes of new instances (rounded down to a multiple of 8; default 64 MiB)");

/* struct fm_header - the first 64 bytes of every migration stream. */
struct fm_header {
	__le64 magic;
	__le32 version;
	__le32 header_size;
	__le64 seed;
	__le64 payload_size;
	__le32 flags;		/* the source's migration flags */
	__le32 block_size;
	u8 uuid[16];		/* the source instance, for the log */
	__le64 reserved;
} __packed;

static_assert(sizeof(struct fm_header) == 64);

enum { FM_REC_DATA = 1, FM_REC_END = 2 };

/*
 * struct fm_rec - a record header. DATA: len is the block's length, arg
 * is generation << 32 | block index, the block's bytes follow. END: len
 * is 0, arg is the digest of the final image.
 */
struct fm_rec {
	__le32 type;
	__le32 len;
	__le64 arg;
} __packed;

static_assert(sizeof(struct fm_rec) == 16);

#define FM_REC sizeof(struct fm_rec)
#define FM_UNIT (FM_REC + FM_BLOCK)	/* the largest record */

struct fm_type {
	struct mdev_type type;
	u32 migration_flags;
};

/* One instance. state_lock guards every field below it. */
struct fm_dev {
	struct vfio_device vdev;
	struct mdev_device *mdev;
	u8 uuid[16];
	u64 power_seed;			/* the seed at power-on, from the UUID */
	u64 size;
	u32 nblocks;
	u32 last_len;			/* bytes in the last block */

	struct mutex state_lock;
	enum vfio_device_mig_state mig_state;
	u64 seed;
	u32 *gens;			/* each block's generation */
	unsigned long *dirty;		/* blocks to send (again) */
	struct file *save;		/* our reference on the saving file */
	struct file *resume;		/* our reference on the resuming file */
	s64 corrupt;			/* stream offset to flip, -1 = off */
	u32 read_delay_ms;		/* each read of a saving stream sleeps first */

	u64 dirty_rate;			/* bytes per second while running */
	u64 dirty_ns;			/* rewrites are due from this time on */
	u64 dirty_carry;		/* bytes due but less than a block */
	u64 rewrites;

	u64 saved_digest, saved_records, saved_bytes;
	bool loaded;
	u64 loaded_digest, loaded_records, loaded_bytes;
	u8 loaded_from[16];
	char last_error[96];

	/* The arcs of the last SET request, for the trace attribute. */
	u8 trace_from[FM_TRACE_MAX];
	u8 trace_to[FM_TRACE_MAX];
	int trace_len;
	int trace_errno;
};

/*
 * One data_fd. It holds a reference on its device, so fm stays valid for
 * the file's life; once the session ends (disabled) it no longer acts on
 * the device. lock serialises read() and write() and owns buf; every other
 * field is guarded by fm->state_lock. Lock order: lock, then state_lock.
 */
struct fm_file {
	struct mutex lock;
	struct fm_dev *fm;
	u8 *buf;			/* FM_UNIT bytes */
	s64 corrupt;			/* saving: stream offset to flip */

	bool disabled;			/* session ended: I/O gives ENODEV */
	u64 pos;			/* stream bytes read or written */

	/* Saving: buf holds the unit being read, ending at produced. */
	u64 produced;
	u32 unit_len;
	bool unit_initial;		/* the unit is part of the first pass */
	bool hdr_done, end_done;
	u32 cursor;			/* next block of the first pass */
	u32 dcursor;			/* where the search for dirty blocks resumes */

	/* Resuming: what the destination has learnt so far. */
	struct fm_header hdr;
	bool hdr_ok;
	u64 seed;			/* from the header once hdr_ok */
	struct fm_rec rec;
	u32 rec_fill;			/* bytes of rec received */
	u32 rec_left;			/* data bytes of the record still to come */
	u32 rec_block, rec_gen;
	bool end_seen;
	u64 end_digest;
	u32 *rgens;			/* the generation each block arrived at */
	unsigned long *rgot;		/* blocks that arrived whole */
	u64 records;
	s64 bad_offset;			/* first mismatching byte, -1 = none */
	char reason[80];		/* a malformed stream, "" when none */
};

static struct fm_parent {
	struct device dev;
	struct class *class;
	struct mdev_parent parent;
} fm_parent;

static atomic_t fm_available = ATOMIC_INIT(FM_MAX_INSTANCES);

static const char *const fm_state_names[] = {
	[VFIO_DEVICE_STATE_ERROR] = "ERROR",
	[VFIO_DEVICE_STATE_STOP] = "STOP",
	[VFIO_DEVICE_STATE_RUNNING] = "RUNNING",
	[VFIO_DEVICE_STATE_STOP_COPY] = "STOP_COPY",
	[VFIO_DEVICE_STATE_RESUMING] = "RESUMING",
	[VFIO_DEVICE_STATE_RUNNING_P2P] = "RUNNING_P2P",
#if FM_PRECOPY
	[VFIO_DEVICE_STATE_PRE_COPY] = "PRE_COPY",
	[VFIO_DEVICE_STATE_PRE_COPY_P2P] = "PRE_COPY_P2P",
#endif
};

/* ---- content ----------------------------------------------------------- */

static u64 fm_mix(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* fm_key is the generator key of the blocks of seed at generation gen. */
static u64 fm_key(u64 seed, u32 gen)
{
	return gen ? fm_mix(seed ^ (gen * 0xd6e8feb86659fd93ULL)) : seed;
}

/* fm_word is payload word i of the content with the given key. */
static u64 fm_word(u64 key, u64 i)
{
	return fm_mix(key + (i + 1) * 0x9e3779b97f4a7c15ULL);
}

/* fm_fill writes payload bytes [off, off+len) of key's content into dst. */
static void fm_fill(u8 *dst, u64 key, u64 off, size_t len)
{
	while (len) {
		u64 i = off / 8, shift = off % 8;
		__le64 w = cpu_to_le64(fm_word(key, i));
		size_t n = min_t(size_t, len, 8 - shift);

		memcpy(dst, (u8 *)&w + shift, n);
		dst += n;
		off += n;
		len -= n;
	}
}

/* fm_check compares src with payload bytes [off, off+len) of key's content
 * and returns the payload offset of the first difference, or -1. */
static s64 fm_check(const u8 *src, u64 key, u64 off, size_t len)
{
	while (len) {
		u64 i = off / 8, shift = off % 8;
		__le64 w = cpu_to_le64(fm_word(key, i));
		size_t n = min_t(size_t, len, 8 - shift);

		if (memcmp(src, (u8 *)&w + shift, n)) {
			size_t k;

			for (k = 0; k < n; k++)
				if (src[k] != ((u8 *)&w)[shift + k])
					return off + k;
		}
		src += n;
		off += n;
		len -= n;
	}
	return -1;
}

/* fm_digest names a whole image: its seed and every block's generation. */
static u64 fm_digest(u64 seed, const u32 *gens, u32 nblocks)
{
	u64 h = fm_mix(seed ^ FM_MAGIC);
	u32 b;

	for (b = 0; b < nblocks; b++)
		h = fm_mix(h ^ ((u64)gens[b] << 32 | b));
	return h;
}

static u32 fm_block_len(const struct fm_dev *fm, u32 b)
{
	return b == fm->nblocks - 1 ? fm->last_len : FM_BLOCK;
}

/* ---- dirtying (state_lock held) ----------------------------------------- */

static bool fm_running(enum vfio_device_mig_state s)
{
	switch (s) {
	case VFIO_DEVICE_STATE_RUNNING:
	case VFIO_DEVICE_STATE_RUNNING_P2P:
#if FM_PRECOPY
	case VFIO_DEVICE_STATE_PRE_COPY:
	case VFIO_DEVICE_STATE_PRE_COPY_P2P:
#endif
		return true;
	default:
		return false;
	}
}

static void fm_rewrite(struct fm_dev *fm, u32 b)
{
	fm->gens[b]++;
	__set_bit(b, fm->dirty);
	fm->rewrites++;
}

/* fm_advance performs the rewrites due since the last look at the state. */
static void fm_advance(struct fm_dev *fm)
{
	u64 now = ktime_get_ns(), due, n;
	u32 b;

	if (!fm_running(fm->mig_state) || !fm->dirty_rate) {
		fm->dirty_ns = now;
		fm->dirty_carry = 0;
		return;
	}
	due = fm->dirty_carry +
	      mul_u64_u64_div_u64(fm->dirty_rate, now - fm->dirty_ns, NSEC_PER_SEC);
	fm->dirty_ns = now;
	n = div_u64(due, FM_BLOCK);
	fm->dirty_carry = due - n * FM_BLOCK;
	if (n >= fm->nblocks) {
		for (b = 0; b < fm->nblocks; b++)
			fm_rewrite(fm, b);
		return;
	}
	while (n--) {
		u64 r = fm_mix(fm->power_seed ^ (fm->rewrites * 0x9e3779b97f4a7c15ULL));

		fm_rewrite(fm, (u32)(r >> 32) % fm->nblocks);
	}
}

/* fm_power_on restores the content a new instance has. */
static void fm_power_on(struct fm_dev *fm)
{
	fm->seed = fm->power_seed;
	memset(fm->gens, 0, fm->nblocks * sizeof(*fm->gens));
	bitmap_zero(fm->dirty, fm->nblocks);
	fm->dirty_ns = ktime_get_ns();
	fm->dirty_carry = 0;
}

/* ---- data_fd files -------------------------------------------------------- */

static void fm_file_free(struct fm_file *f)
{
	kvfree(f->buf);
	kvfree(f->rgens);
	bitmap_free(f->rgot);
	kfree(f);
}

static int fm_file_release(struct inode *inode, struct file *filp)
{
	struct fm_file *f = filp->private_data;
	struct fm_dev *fm = f->fm;

	mutex_destroy(&f->lock);
	fm_file_free(f);
	vfio_put_device(&fm->vdev);	/* the reference fm_file_open took */
	return 0;
}

/* fm_unit accounts for a new unit of len bytes just put in f->buf. */
static void fm_unit(struct fm_file *f, u32 len, bool initial)
{
	f->unit_len = len;
	f->unit_initial = initial;
	f->produced += len;
	f->fm->saved_bytes += len;
}

static void fm_emit_header(struct fm_file *f)
{
	struct fm_dev *fm = f->fm;
	struct fm_header *h = (struct fm_header *)f->buf;

	memset(h, 0, sizeof(*h));
	h->magic = cpu_to_le64(FM_MAGIC);
	h->version = cpu_to_le32(FM_VERSION);
	h->header_size = cpu_to_le32(sizeof(*h));
	h->seed = cpu_to_le64(fm->seed);
	h->payload_size = cpu_to_le64(fm->size);
	h->flags = cpu_to_le32(fm->vdev.migration_flags);
	h->block_size = cpu_to_le32(FM_BLOCK);
	memcpy(h->uuid, fm->uuid, sizeof(h->uuid));
	fm_unit(f, sizeof(*h), true);
}

static void fm_emit_block(struct fm_file *f, u32 b, bool initial)
{
	struct fm_dev *fm = f->fm;
	struct fm_rec *r = (struct fm_rec *)f->buf;
	u32 len = fm_block_len(fm, b), gen = fm->gens[b];

	r->type = cpu_to_le32(FM_REC_DATA);
	r->len = cpu_to_le32(len);
	r->arg = cpu_to_le64((u64)gen << 32 | b);
	fm_fill(f->buf + FM_REC, fm_key(fm->seed, gen), (u64)b * FM_BLOCK, len);
	__clear_bit(b, fm->dirty);
	fm->saved_records++;
	fm_unit(f, FM_REC + len, initial);
}

static void fm_emit_end(struct fm_file *f)
{
	struct fm_dev *fm = f->fm;
	struct fm_rec *r = (struct fm_rec *)f->buf;

	r->type = cpu_to_le32(FM_REC_END);
	r->len = 0;
	r->arg = cpu_to_le64(fm_digest(fm->seed, fm->gens, fm->nblocks));
	fm_unit(f, FM_REC, false);
}

/*
 * fm_produce puts the next unit of the saving stream in f->buf: the
 * header, the first pass, then dirty blocks, then (in STOP_COPY only) the
 * end record. Returns 0, -ENOMSG at the temporary end of PRE_COPY data, or
 * FM_EOF. Called with f->lock and state_lock held, f->buf consumed.
 */
static int fm_produce(struct fm_file *f)
{
	struct fm_dev *fm = f->fm;
	u32 b;

	fm_advance(fm);
	if (!f->hdr_done) {
		fm_emit_header(f);
		f->hdr_done = true;
		return 0;
	}
	if (f->cursor < fm->nblocks) {
		fm_emit_block(f, f->cursor++, true);
		return 0;
	}
	b = find_next_bit(fm->dirty, fm->nblocks, f->dcursor);
	if (b >= fm->nblocks)
		b = find_first_bit(fm->dirty, fm->nblocks);
	if (b < fm->nblocks) {
		f->dcursor = b + 1;
		fm_emit_block(f, b, false);
		return 0;
	}
	if (fm->mig_state != VFIO_DEVICE_STATE_STOP_COPY)
		return -ENOMSG;
	if (!f->end_done) {
		fm_emit_end(f);
		f->end_done = true;
		return 0;
	}
	return FM_EOF;
}

static ssize_t fm_save_read(struct file *filp, char __user *ubuf, size_t len,
			    loff_t *ppos)
{
	struct fm_file *f = filp->private_data;
	struct fm_dev *fm = f->fm;
	ssize_t done = 0;
	int ret = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&fm->state_lock);
	ret = fm->read_delay_ms;
	mutex_unlock(&fm->state_lock);
	if (ret && msleep_interruptible(ret))
		return -EINTR;
	ret = 0;

	mutex_lock(&f->lock);
	while (len) {
		size_t n, left, off;

		mutex_lock(&fm->state_lock);
		if (f->disabled)
			ret = -ENODEV;
		else if (f->produced == f->pos)
			ret = fm_produce(f);
		left = f->produced - f->pos;
		mutex_unlock(&fm->state_lock);
		if (ret)
			break;

		n = min(len, left);
		off = f->unit_len - left;
		if (f->corrupt >= 0 && (u64)f->corrupt >= f->pos &&
		    (u64)f->corrupt < f->pos + n)
			f->buf[off + f->corrupt - f->pos] ^= 0xff;
		if (copy_to_user(ubuf + done, f->buf + off, n)) {
			ret = -EFAULT;
			break;
		}
		mutex_lock(&fm->state_lock);
		f->pos += n;
		mutex_unlock(&fm->state_lock);
		done += n;
		len -= n;
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
	mutex_unlock(&f->lock);
	if (done)
		return done;
	return ret == FM_EOF ? 0 : ret;
}

#if FM_PRECOPY
/* fm_span_bytes is the stream size of the records of blocks [from, to). */
static u64 fm_span_bytes(const struct fm_dev *fm, u32 from, u32 to)
{
	u64 n;

	if (from >= to)
		return 0;
	n = (u64)(to - from) * FM_UNIT;
	if (to == fm->nblocks)
		n -= FM_BLOCK - fm->last_len;
	return n;
}

/* fm_dirty_bytes is the stream size of the dirty blocks below upto. */
static u64 fm_dirty_bytes(const struct fm_dev *fm, u32 upto)
{
	u64 n = (u64)bitmap_weight(fm->dirty, upto) * FM_UNIT;

	if (upto == fm->nblocks && test_bit(upto - 1, fm->dirty))
		n -= FM_BLOCK - fm->last_len;
	return n;
}

/* fm_pending splits what the saving stream still has before its end
 * record into first-pass and dirty bytes. state_lock held. */
static void fm_pending(const struct fm_file *f, u64 *initial, u64 *dirty)
{
	const struct fm_dev *fm = f->fm;
	u64 left = f->produced - f->pos;

	*initial = f->unit_initial ? left : 0;
	*dirty = f->unit_initial ? 0 : left;
	if (!f->hdr_done)
		*initial += sizeof(struct fm_header);
	*initial += fm_span_bytes(fm, f->cursor, fm->nblocks);
	*dirty += fm_dirty_bytes(fm, f->cursor);
}

/* fm_remaining is what the saving stream still yields if it stops now. */
static u64 fm_remaining(const struct fm_file *f)
{
	u64 initial, dirty;

	fm_pending(f, &initial, &dirty);
	return initial + dirty + (f->end_done ? 0 : FM_REC);
}

static u64 fm_full_size(const struct fm_dev *fm)
{
	return sizeof(struct fm_header) + fm_span_bytes(fm, 0, fm->nblocks) + FM_REC;
}

static long fm_save_ioctl(struct file *filp, unsigned int cmd,
			  unsigned long arg)
{
	struct fm_file *f = filp->private_data;
	struct fm_dev *fm = f->fm;
	unsigned long minsz = offsetofend(struct vfio_precopy_info, dirty_bytes);
	struct vfio_precopy_info info;
	u64 initial, dirty;
	int ret = 0;

	if (cmd != VFIO_MIG_GET_PRECOPY_INFO)
		return -ENOTTY;
	if (copy_from_user(&info, (void __user *)arg, minsz))
		return -EFAULT;
	if (info.argsz < minsz)
		return -EINVAL;

	mutex_lock(&fm->state_lock);
	if (f->disabled) {
		ret = -ENODEV;
	} else if (fm->mig_state != VFIO_DEVICE_STATE_PRE_COPY &&
		   fm->mig_state != VFIO_DEVICE_STATE_PRE_COPY_P2P) {
		ret = -EINVAL;
	} else {
		fm_advance(fm);
		fm_pending(f, &initial, &dirty);
		info.initial_bytes = initial;
		info.dirty_bytes = dirty;
	}
	mutex_unlock(&fm->state_lock);
	if (ret)
		return ret;
	return copy_to_user((void __user *)arg, &info, minsz) ? -EFAULT : 0;
}
#endif

/* ---- the resuming stream (state_lock held) -------------------------------- */

static void fm_check_header(struct fm_file *f)
{
	const struct fm_header *h = &f->hdr;

	if (le64_to_cpu(h->magic) != FM_MAGIC ||
	    le32_to_cpu(h->version) != FM_VERSION ||
	    le32_to_cpu(h->header_size) != sizeof(*h))
		snprintf(f->reason, sizeof(f->reason), "bad header");
	else if (le64_to_cpu(h->payload_size) != f->fm->size)
		snprintf(f->reason, sizeof(f->reason), "payload size %llu, want %llu",
			 le64_to_cpu(h->payload_size), f->fm->size);
	else if (le32_to_cpu(h->block_size) != FM_BLOCK)
		snprintf(f->reason, sizeof(f->reason), "block size %u, want %u",
			 le32_to_cpu(h->block_size), FM_BLOCK);
	else {
		f->hdr_ok = true;
		f->seed = le64_to_cpu(h->seed);
	}
}

static size_t fm_take_header(struct fm_file *f, const u8 *p, size_t n)
{
	size_t k = min_t(size_t, n, sizeof(f->hdr) - f->pos);

	memcpy((u8 *)&f->hdr + f->pos, p, k);
	if (f->pos + k == sizeof(f->hdr))
		fm_check_header(f);
	return k;
}

/* fm_start_record checks the record header just received at stream
 * offset at. */
static void fm_start_record(struct fm_file *f, u64 at)
{
	u32 type = le32_to_cpu(f->rec.type), len = le32_to_cpu(f->rec.len);
	u64 arg = le64_to_cpu(f->rec.arg);
	u32 b = (u32)arg;

	if (type == FM_REC_END && len == 0) {
		f->end_seen = true;
		f->end_digest = arg;
		f->rec_fill = 0;
	} else if (type == FM_REC_DATA && b < f->fm->nblocks &&
		   len == fm_block_len(f->fm, b)) {
		f->rec_block = b;
		f->rec_gen = arg >> 32;
		f->rec_left = len;
	} else {
		snprintf(f->reason, sizeof(f->reason),
			 "bad record at stream byte %llu", at);
	}
}

static size_t fm_take_rec(struct fm_file *f, const u8 *p, size_t n)
{
	size_t k = min_t(size_t, n, FM_REC - f->rec_fill);

	memcpy((u8 *)&f->rec + f->rec_fill, p, k);
	f->rec_fill += k;
	if (f->rec_fill == FM_REC)
		fm_start_record(f, f->pos + k - FM_REC);
	return k;
}

static size_t fm_take_data(struct fm_file *f, const u8 *p, size_t n)
{
	struct fm_dev *fm = f->fm;
	size_t k = min_t(size_t, n, f->rec_left);
	u64 off = (u64)f->rec_block * FM_BLOCK +
		  fm_block_len(fm, f->rec_block) - f->rec_left;

	if (f->bad_offset < 0) {
		s64 bad = fm_check(p, fm_key(f->seed, f->rec_gen), off, k);

		if (bad >= 0)
			f->bad_offset = f->pos + (bad - off);
	}
	f->rec_left -= k;
	if (!f->rec_left) {
		f->rgens[f->rec_block] = f->rec_gen;
		__set_bit(f->rec_block, f->rgot);
		f->records++;
		f->rec_fill = 0;
	}
	return k;
}

/* fm_resume_consume parses n stream bytes; it takes them all unless the
 * end record came first, and returns how many it took. */
static size_t fm_resume_consume(struct fm_file *f, const u8 *p, size_t n)
{
	size_t took = 0, k;

	while (took < n && !f->end_seen) {
		if (f->pos < sizeof(f->hdr))
			k = fm_take_header(f, p + took, n - took);
		else if (f->reason[0])
			k = n - took;		/* malformed: the rest is ignored */
		else if (f->rec_fill < FM_REC)
			k = fm_take_rec(f, p + took, n - took);
		else
			k = fm_take_data(f, p + took, n - took);
		f->pos += k;
		took += k;
	}
	return took;
}

static ssize_t fm_resume_write(struct file *filp, const char __user *ubuf,
			       size_t len, loff_t *ppos)
{
	struct fm_file *f = filp->private_data;
	struct fm_dev *fm = f->fm;
	ssize_t done = 0;
	int ret = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&f->lock);
	while (len) {
		size_t n = min_t(size_t, len, FM_UNIT), took = 0;

		if (copy_from_user(f->buf, ubuf + done, n)) {
			ret = -EFAULT;
			break;
		}
		mutex_lock(&fm->state_lock);
		if (f->disabled)
			ret = -ENODEV;
		else
			took = fm_resume_consume(f, f->buf, n);
		mutex_unlock(&fm->state_lock);
		done += took;
		len -= took;
		if (ret)
			break;
		if (took < n) {
			/* Past the end record: like mlx5 and mtty, refuse it. */
			ret = -ENOMEM;
			break;
		}
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
	mutex_unlock(&f->lock);
	return done ? done : ret;
}

static const struct file_operations fm_save_fops = {
	.owner = THIS_MODULE,
	.read = fm_save_read,
#if FM_PRECOPY
	.unlocked_ioctl = fm_save_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
#endif
	.release = fm_file_release,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
	.llseek = no_llseek,
#endif
};

static const struct file_operations fm_resume_fops = {
	.owner = THIS_MODULE,
	.write = fm_resume_write,
	.release = fm_file_release,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
	.llseek = no_llseek,
#endif
};

/*
 * fm_file_open makes a data_fd file; the caller gets two references: one
 * for the VFIO core to install as the user's fd, one for the device. A
 * saving file starts a new session: every block is to be sent.
 * state_lock held.
 */
static struct file *fm_file_open(struct fm_dev *fm, bool save)
{
	struct fm_file *f;
	struct file *filp;

	f = kzalloc(sizeof(*f), GFP_KERNEL_ACCOUNT);
	if (!f)
		return ERR_PTR(-ENOMEM);
	f->buf = kvmalloc(FM_UNIT, GFP_KERNEL_ACCOUNT);
	if (!save) {
		f->rgens = kvcalloc(fm->nblocks, sizeof(*f->rgens), GFP_KERNEL_ACCOUNT);
		f->rgot = bitmap_zalloc(fm->nblocks, GFP_KERNEL_ACCOUNT);
	}
	if (!f->buf || (!save && (!f->rgens || !f->rgot))) {
		fm_file_free(f);
		return ERR_PTR(-ENOMEM);
	}
	mutex_init(&f->lock);
	f->fm = fm;
	f->bad_offset = -1;
	f->corrupt = save ? fm->corrupt : -1;

	filp = anon_inode_getfile(save ? "[ferry_mig-save]" : "[ferry_mig-resume]",
				  save ? &fm_save_fops : &fm_resume_fops, f,
				  save ? O_RDONLY : O_WRONLY);
	if (IS_ERR(filp)) {
		mutex_destroy(&f->lock);
		fm_file_free(f);
		return filp;
	}
	get_device(&fm->vdev.device);	/* dropped by fm_file_release */
	stream_open(filp->f_inode, filp);
	get_file(filp);
	if (save) {
		bitmap_fill(fm->dirty, fm->nblocks);
		fm->saved_digest = 0;
		fm->saved_records = 0;
		fm->saved_bytes = 0;
	}
	return filp;
}

/* fm_file_end ends a session: the user's fd now fails with ENODEV. */
static void fm_file_end(struct file **slot)
{
	struct fm_file *f;

	if (!*slot)
		return;
	f = (*slot)->private_data;
	f->disabled = true;
	fput(*slot);
	*slot = NULL;
}

static void fm_end_sessions(struct fm_dev *fm)
{
	fm_file_end(&fm->save);
	fm_file_end(&fm->resume);
}

/* fm_load_error says what is wrong with the resuming stream, or "". */
static void fm_load_error(struct fm_dev *fm, struct fm_file *f, char *msg,
			  size_t size)
{
	u32 b;
	u64 d;

	msg[0] = 0;
	if (f->reason[0]) {
		snprintf(msg, size, "%s", f->reason);
	} else if (f->bad_offset >= 0) {
		snprintf(msg, size, "mismatch at stream byte %lld", f->bad_offset);
	} else if (!f->end_seen) {
		snprintf(msg, size, "short stream: %llu bytes, no end record", f->pos);
	} else if ((b = find_first_zero_bit(f->rgot, fm->nblocks)) < fm->nblocks) {
		snprintf(msg, size, "block %u never arrived", b);
	} else {
		d = fm_digest(f->seed, f->rgens, fm->nblocks);
		if (d != f->end_digest)
			snprintf(msg, size, "final image %016llx, the source's %016llx",
				 d, f->end_digest);
	}
}

/* fm_load validates the resuming stream and, if it holds a whole final
 * image, makes it this device's state. state_lock held. */
static int fm_load(struct fm_dev *fm)
{
	struct fm_file *f;

	if (WARN_ON(!fm->resume))	/* RESUMING always has its file */
		return -EINVAL;
	f = fm->resume->private_data;
	fm_load_error(fm, f, fm->last_error, sizeof(fm->last_error));
	if (fm->last_error[0]) {
		dev_info(&fm->mdev->dev, "RESUMING->STOP refused: %s\n",
			 fm->last_error);
		return -EINVAL;
	}
	fm->seed = f->seed;
	memcpy(fm->gens, f->rgens, fm->nblocks * sizeof(*fm->gens));
	fm->loaded = true;
	fm->loaded_digest = f->end_digest;
	fm->loaded_records = f->records;
	fm->loaded_bytes = f->pos;
	memcpy(fm->loaded_from, f->hdr.uuid, sizeof(fm->loaded_from));
	dev_info(&fm->mdev->dev, "loaded image %016llx (%llu records) from %pUl\n",
		 fm->loaded_digest, f->records, f->hdr.uuid);
	return 0;
}

/* ---- the state machine (state_lock held) --------------------------------- */

#define FM_ARC(from, to) ((from) << 4 | (to))

/* fm_save_open starts a saving session (STOP_COPY, PRE_COPY, PRE_COPY_P2P). */
static struct file *fm_save_open(struct fm_dev *fm)
{
	struct file *filp = fm_file_open(fm, true);

	if (!IS_ERR(filp))
		fm->save = filp;
	return filp;
}

/* fm_arc performs one arc of the FSM from fm->mig_state to next. */
static struct file *fm_arc(struct fm_dev *fm, enum vfio_device_mig_state next)
{
	struct file *filp;
	int ret;

	switch (FM_ARC(fm->mig_state, next)) {
	case FM_ARC(VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_STOP_COPY):
		filp = fm_save_open(fm);
		if (!IS_ERR(filp))
			fm->saved_digest = fm_digest(fm->seed, fm->gens, fm->nblocks);
		return filp;
	case FM_ARC(VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_RESUMING):
		filp = fm_file_open(fm, false);
		if (!IS_ERR(filp))
			fm->resume = filp;
		return filp;
	case FM_ARC(VFIO_DEVICE_STATE_STOP_COPY, VFIO_DEVICE_STATE_STOP):
		fm_file_end(&fm->save);
		return NULL;
	case FM_ARC(VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_STOP):
		ret = fm_load(fm);
		if (ret)
			return ERR_PTR(ret);
		fm_file_end(&fm->resume);
		return NULL;
#if FM_PRECOPY
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_PRE_COPY):
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING_P2P, VFIO_DEVICE_STATE_PRE_COPY_P2P):
		return fm_save_open(fm);
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY, VFIO_DEVICE_STATE_STOP_COPY):
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY_P2P, VFIO_DEVICE_STATE_STOP_COPY):
		/* The same stream goes on; from now on nothing changes. */
		fm->saved_digest = fm_digest(fm->seed, fm->gens, fm->nblocks);
		return NULL;
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY, VFIO_DEVICE_STATE_RUNNING):
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY_P2P, VFIO_DEVICE_STATE_RUNNING_P2P):
		fm_file_end(&fm->save);
		return NULL;
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY, VFIO_DEVICE_STATE_PRE_COPY_P2P):
	case FM_ARC(VFIO_DEVICE_STATE_PRE_COPY_P2P, VFIO_DEVICE_STATE_PRE_COPY):
#endif
	/* Arcs between RUNNING, RUNNING_P2P and STOP: nothing to quiesce. */
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_RUNNING_P2P):
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING_P2P, VFIO_DEVICE_STATE_RUNNING):
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING_P2P, VFIO_DEVICE_STATE_STOP):
	case FM_ARC(VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_RUNNING_P2P):
	case FM_ARC(VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_STOP):
	case FM_ARC(VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_RUNNING):
		return NULL;
	}
	/* vfio_mig_get_next_state never asks for anything else. */
	WARN_ON(true);
	return ERR_PTR(-EINVAL);
}

/* fm_refused reports requests the driver refuses before the core's walker
 * sees them: any from ERROR (only a reset leaves it; the walker would
 * WARN), and STOP_COPY -> PRE_COPY(_P2P), which the uAPI forbids and on
 * which kernels without the 2026 fix of vfio_mig_get_next_state spin. */
static bool fm_refused(enum vfio_device_mig_state cur,
		       enum vfio_device_mig_state target)
{
	if (cur == VFIO_DEVICE_STATE_ERROR)
		return true;
#if FM_PRECOPY
	if (cur == VFIO_DEVICE_STATE_STOP_COPY &&
	    (target == VFIO_DEVICE_STATE_PRE_COPY ||
	     target == VFIO_DEVICE_STATE_PRE_COPY_P2P))
		return true;
#endif
	return false;
}

static void fm_trace_arc(struct fm_dev *fm, enum vfio_device_mig_state next)
{
	if (fm->trace_len < FM_TRACE_MAX) {
		fm->trace_from[fm->trace_len] = fm->mig_state;
		fm->trace_to[fm->trace_len] = next;
		fm->trace_len++;
	}
}

static struct file *fm_set_state(struct vfio_device *vdev,
				 enum vfio_device_mig_state new_state)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);
	enum vfio_device_mig_state next;
	struct file *res = NULL;
	int ret;

	mutex_lock(&fm->state_lock);
	fm->trace_len = 0;
	fm_advance(fm);
	if (fm_refused(fm->mig_state, new_state)) {
		res = ERR_PTR(-EINVAL);
		goto out;
	}
	while (new_state != fm->mig_state) {
		ret = vfio_mig_get_next_state(vdev, fm->mig_state, new_state,
					      &next);
		if (ret) {
			res = ERR_PTR(ret);
			break;
		}
		fm_trace_arc(fm, next);
		res = fm_arc(fm, next);
		if (IS_ERR(res))
			break;
		fm->mig_state = next;
		if (WARN_ON(res && new_state != fm->mig_state)) {
			/* A data_fd can only come from the last arc. */
			fput(res);
			res = ERR_PTR(-EINVAL);
			break;
		}
	}
out:
	fm->trace_errno = IS_ERR(res) ? -PTR_ERR(res) : 0;
	mutex_unlock(&fm->state_lock);
	return res;
}

static int fm_get_state(struct vfio_device *vdev,
			enum vfio_device_mig_state *state)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_lock(&fm->state_lock);
	*state = fm->mig_state;
	mutex_unlock(&fm->state_lock);
	return 0;
}

#if FM_PRECOPY
/* fm_get_data_size: what an immediate STOP_COPY would still return. */
static int fm_get_data_size(struct vfio_device *vdev,
			    unsigned long *stop_copy_length)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_lock(&fm->state_lock);
	fm_advance(fm);
	if (fm->save)
		*stop_copy_length = fm_remaining(fm->save->private_data);
	else
		*stop_copy_length = fm_full_size(fm);
	mutex_unlock(&fm->state_lock);
	return 0;
}
#endif

static const struct vfio_migration_ops fm_mig_ops = {
	.migration_set_state = fm_set_state,
	.migration_get_state = fm_get_state,
#if FM_PRECOPY
	.migration_get_data_size = fm_get_data_size,
#endif
};

/* ---- vfio_device_ops -------------------------------------------------- */

static int fm_init_dev(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);
	struct mdev_device *mdev = to_mdev_device(vdev->dev);
	struct fm_type *type = container_of(mdev->type, struct fm_type, type);
	u64 seed = 0;
	int i;

	if (!atomic_add_unless(&fm_available, -1, 0))
		return -ENOSPC;

	fm->mdev = mdev;
	export_guid(fm->uuid, &mdev->uuid);
	fm->size = max(8UL, round_down(READ_ONCE(state_size), 8UL));
	fm->nblocks = DIV_ROUND_UP_ULL(fm->size, FM_BLOCK);
	fm->last_len = fm->size - (u64)(fm->nblocks - 1) * FM_BLOCK;
	fm->gens = kvcalloc(fm->nblocks, sizeof(*fm->gens), GFP_KERNEL);
	fm->dirty = bitmap_zalloc(fm->nblocks, GFP_KERNEL);
	if (!fm->gens || !fm->dirty) {
		kvfree(fm->gens);
		bitmap_free(fm->dirty);
		atomic_inc(&fm_available);
		return -ENOMEM;
	}
	for (i = 0; i < 16; i++)
		seed = fm_mix(seed ^ (u64)mdev->uuid.b[i] << (8 * (i % 8)));
	fm->power_seed = seed;
	mutex_init(&fm->state_lock);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
	fm->corrupt = -1;
	fm_power_on(fm);

	vdev->migration_flags = type->migration_flags;
	vdev->mig_ops = &fm_mig_ops;
	return 0;
}

static void fm_release_dev(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	kvfree(fm->gens);
	bitmap_free(fm->dirty);
	mutex_destroy(&fm->state_lock);
	atomic_inc(&fm_available);
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0)
	vfio_free_device(vdev);		/* 6.2 and later: the core frees it */
#endif
}

/* fm_reset ends any session, returns to RUNNING and restores the power-on
 * content. state_lock held. */
static void fm_reset(struct fm_dev *fm)
{
	fm_end_sessions(fm);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
	fm_power_on(fm);
}

static int fm_open_device(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_lock(&fm->state_lock);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
	mutex_unlock(&fm->state_lock);
	return 0;
}

/* The last fd closed: reset, as vfio-pci does. The sessions must end
 * before close_device returns. */
static void fm_close_device(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_lock(&fm->state_lock);
	fm_reset(fm);
	mutex_unlock(&fm->state_lock);
}

static long fm_ioctl(struct vfio_device *vdev, unsigned int cmd,
		     unsigned long arg)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	switch (cmd) {
	case VFIO_DEVICE_GET_INFO: {
		struct vfio_device_info info;
		unsigned long minsz = offsetofend(struct vfio_device_info, num_irqs);

		if (copy_from_user(&info, (void __user *)arg, minsz))
			return -EFAULT;
		if (info.argsz < minsz)
			return -EINVAL;
		/* A platform-style device with no regions and no interrupts. */
		info.flags = VFIO_DEVICE_FLAGS_PLATFORM | VFIO_DEVICE_FLAGS_RESET;
		info.num_regions = 0;
		info.num_irqs = 0;
		return copy_to_user((void __user *)arg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_RESET:
		mutex_lock(&fm->state_lock);
		fm_reset(fm);
		fm->trace_len = 0;
		fm->trace_errno = 0;
		mutex_unlock(&fm->state_lock);
		return 0;
	}
	return -ENOTTY;
}

static const struct vfio_device_ops fm_dev_ops = {
	.name = "vfio-ferry-mig",
	.init = fm_init_dev,
	.release = fm_release_dev,
	.open_device = fm_open_device,
	.close_device = fm_close_device,
	.ioctl = fm_ioctl,
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
	/* NULL without CONFIG_IOMMUFD (Debian's kernels). */
	.bind_iommufd = vfio_iommufd_emulated_bind,
	.unbind_iommufd = vfio_iommufd_emulated_unbind,
	.attach_ioas = vfio_iommufd_emulated_attach_ioas,
	.detach_ioas = vfio_iommufd_emulated_detach_ioas,
#endif
};

/* ---- sysfs ------------------------------------------------------------ */

static struct fm_dev *fm_from_dev(struct device *dev)
{
	return dev_get_drvdata(dev);
}

static ssize_t state_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	enum vfio_device_mig_state s;

	mutex_lock(&fm->state_lock);
	s = fm->mig_state;
	mutex_unlock(&fm->state_lock);
	if (s < ARRAY_SIZE(fm_state_names) && fm_state_names[s])
		return sysfs_emit(buf, "%s\n", fm_state_names[s]);
	return sysfs_emit(buf, "%u\n", s);
}
static DEVICE_ATTR_RO(state);

static ssize_t seed_show(struct device *dev, struct device_attribute *attr,
			 char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u64 seed;

	mutex_lock(&fm->state_lock);
	seed = fm->seed;
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%016llx\n", seed);
}
static DEVICE_ATTR_RO(seed);

static ssize_t digest_show(struct device *dev, struct device_attribute *attr,
			   char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u64 d;

	mutex_lock(&fm->state_lock);
	fm_advance(fm);
	d = fm_digest(fm->seed, fm->gens, fm->nblocks);
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%016llx\n", d);
}
static DEVICE_ATTR_RO(digest);

static ssize_t size_show(struct device *dev, struct device_attribute *attr,
			 char *buf)
{
	return sysfs_emit(buf, "%llu\n", fm_from_dev(dev)->size);
}
static DEVICE_ATTR_RO(size);

static ssize_t block_size_show(struct device *dev,
			       struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", FM_BLOCK);
}
static DEVICE_ATTR_RO(block_size);

static ssize_t flags_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	return sysfs_emit(buf, "%u\n", fm_from_dev(dev)->vdev.migration_flags);
}
static DEVICE_ATTR_RO(flags);

static ssize_t trace_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	int i, n = 0;

	mutex_lock(&fm->state_lock);
	for (i = 0; i < fm->trace_len; i++)
		n += sysfs_emit_at(buf, n, "%u>%u ", fm->trace_from[i],
				   fm->trace_to[i]);
	n += sysfs_emit_at(buf, n, "= %d\n", fm->trace_errno);
	mutex_unlock(&fm->state_lock);
	return n;
}
static DEVICE_ATTR_RO(trace);

static ssize_t corrupt_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	s64 v;

	mutex_lock(&fm->state_lock);
	v = fm->corrupt;
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%lld\n", v);
}

static ssize_t corrupt_store(struct device *dev, struct device_attribute *attr,
			     const char *buf, size_t count)
{
	struct fm_dev *fm = fm_from_dev(dev);
	s64 v;
	int ret = kstrtoll(buf, 0, &v);

	if (ret)
		return ret;
	if (v < -1)
		return -EINVAL;
	mutex_lock(&fm->state_lock);
	fm->corrupt = v;
	mutex_unlock(&fm->state_lock);
	return count;
}
static DEVICE_ATTR_RW(corrupt);

static ssize_t last_error_show(struct device *dev,
			       struct device_attribute *attr, char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	ssize_t n;

	mutex_lock(&fm->state_lock);
	n = sysfs_emit(buf, "%s\n", fm->last_error);
	mutex_unlock(&fm->state_lock);
	return n;
}
static DEVICE_ATTR_RO(last_error);

static ssize_t inject_error_store(struct device *dev,
				  struct device_attribute *attr,
				  const char *buf, size_t count)
{
	struct fm_dev *fm = fm_from_dev(dev);
	bool v;
	int ret = kstrtobool(buf, &v);

	if (ret)
		return ret;
	if (v) {
		mutex_lock(&fm->state_lock);
		fm_end_sessions(fm);
		fm->mig_state = VFIO_DEVICE_STATE_ERROR;
		mutex_unlock(&fm->state_lock);
	}
	return count;
}
static DEVICE_ATTR_WO(inject_error);

static ssize_t dirty_rate_show(struct device *dev,
			       struct device_attribute *attr, char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u64 v;

	mutex_lock(&fm->state_lock);
	v = fm->dirty_rate;
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%llu\n", v);
}

static ssize_t dirty_rate_store(struct device *dev,
				struct device_attribute *attr,
				const char *buf, size_t count)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u64 v;
	int ret = kstrtou64(buf, 0, &v);

	if (ret)
		return ret;
	if (v > FM_MAX_RATE)
		return -EINVAL;
	mutex_lock(&fm->state_lock);
	fm_advance(fm);		/* what is due so far, at the old rate */
	fm->dirty_rate = v;
	mutex_unlock(&fm->state_lock);
	return count;
}
static DEVICE_ATTR_RW(dirty_rate);

/* read_delay_ms: a slow device, so a test can act mid-STOP_COPY. */
static ssize_t read_delay_ms_show(struct device *dev,
				  struct device_attribute *attr, char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u32 v;

	mutex_lock(&fm->state_lock);
	v = fm->read_delay_ms;
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%u\n", v);
}

static ssize_t read_delay_ms_store(struct device *dev,
				   struct device_attribute *attr,
				   const char *buf, size_t count)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u32 v;
	int ret = kstrtou32(buf, 0, &v);

	if (ret)
		return ret;
	if (v > 10000)
		return -EINVAL;
	mutex_lock(&fm->state_lock);
	fm->read_delay_ms = v;
	mutex_unlock(&fm->state_lock);
	return count;
}
static DEVICE_ATTR_RW(read_delay_ms);

static ssize_t dirty_store(struct device *dev, struct device_attribute *attr,
			   const char *buf, size_t count)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u32 b;
	int ret = kstrtou32(buf, 0, &b);

	if (ret)
		return ret;
	if (b >= fm->nblocks)
		return -EINVAL;
	mutex_lock(&fm->state_lock);
	if (fm_running(fm->mig_state)) {
		fm_advance(fm);
		fm_rewrite(fm, b);
	} else {
		ret = -EBUSY;	/* a stopped device does not change */
	}
	mutex_unlock(&fm->state_lock);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(dirty);

static ssize_t rewrites_show(struct device *dev,
			     struct device_attribute *attr, char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	u64 v;

	mutex_lock(&fm->state_lock);
	fm_advance(fm);
	v = fm->rewrites;
	mutex_unlock(&fm->state_lock);
	return sysfs_emit(buf, "%llu\n", v);
}
static DEVICE_ATTR_RO(rewrites);

static ssize_t saved_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	ssize_t n;

	mutex_lock(&fm->state_lock);
	n = sysfs_emit(buf, "digest=%016llx records=%llu bytes=%llu\n",
		       fm->saved_digest, fm->saved_records, fm->saved_bytes);
	mutex_unlock(&fm->state_lock);
	return n;
}
static DEVICE_ATTR_RO(saved);

static ssize_t loaded_show(struct device *dev, struct device_attribute *attr,
			   char *buf)
{
	struct fm_dev *fm = fm_from_dev(dev);
	ssize_t n = 0;

	mutex_lock(&fm->state_lock);
	if (fm->loaded)
		n = sysfs_emit(buf, "digest=%016llx records=%llu bytes=%llu from=%pUl\n",
			       fm->loaded_digest, fm->loaded_records,
			       fm->loaded_bytes, fm->loaded_from);
	else
		n = sysfs_emit(buf, "\n");
	mutex_unlock(&fm->state_lock);
	return n;
}
static DEVICE_ATTR_RO(loaded);

static struct attribute *fm_dev_attrs[] = {
	&dev_attr_state.attr,
	&dev_attr_seed.attr,
	&dev_attr_digest.attr,
	&dev_attr_size.attr,
	&dev_attr_block_size.attr,
	&dev_attr_flags.attr,
	&dev_attr_trace.attr,
	&dev_attr_corrupt.attr,
	&dev_attr_last_error.attr,
	&dev_attr_inject_error.attr,
	&dev_attr_dirty_rate.attr,
	&dev_attr_read_delay_ms.attr,
	&dev_attr_dirty.attr,
	&dev_attr_rewrites.attr,
	&dev_attr_saved.attr,
	&dev_attr_loaded.attr,
	NULL,
};

static const struct attribute_group fm_dev_group = {
	.name = "migration",
	.attrs = fm_dev_attrs,
};

static const struct attribute_group *fm_dev_groups[] = {
	&fm_dev_group,
	NULL,
};

/* ---- mdev driver and parent ------------------------------------------- */

static int fm_probe(struct mdev_device *mdev)
{
	struct fm_dev *fm;
	int ret;

	fm = vfio_alloc_device(fm_dev, vdev, &mdev->dev, &fm_dev_ops);
	if (IS_ERR(fm))
		return PTR_ERR(fm);
	dev_set_drvdata(&mdev->dev, fm);
	ret = vfio_register_emulated_iommu_dev(&fm->vdev);
	if (ret) {
		vfio_put_device(&fm->vdev);
		return ret;
	}
	dev_info(&mdev->dev, "flags %u, state %llu bytes in %u blocks, seed %016llx\n",
		 fm->vdev.migration_flags, fm->size, fm->nblocks, fm->seed);
	return 0;
}

static void fm_remove(struct mdev_device *mdev)
{
	struct fm_dev *fm = dev_get_drvdata(&mdev->dev);

	vfio_unregister_group_dev(&fm->vdev);
	vfio_put_device(&fm->vdev);
}

static unsigned int fm_get_available(struct mdev_type *mtype)
{
	return atomic_read(&fm_available);
}

static ssize_t fm_show_description(struct mdev_type *mtype, char *buf)
{
	struct fm_type *type = container_of(mtype, struct fm_type, type);

	return sysfs_emit(buf, "ferry migration test device, flags %u\n",
			  type->migration_flags);
}

static struct mdev_driver fm_driver = {
	.device_api = VFIO_DEVICE_API_PLATFORM_STRING,
	.driver = {
		.name = FM_NAME,
		.owner = THIS_MODULE,
		.mod_name = KBUILD_MODNAME,
		.dev_groups = fm_dev_groups,
	},
	.probe = fm_probe,
	.remove = fm_remove,
	.get_available = fm_get_available,
	.show_description = fm_show_description,
};

static struct fm_type fm_types[] = {
	{
		.type.sysfs_name = "p2p",
		.type.pretty_name = "ferry migration (STOP_COPY, P2P)",
		.migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
	},
	{
		.type.sysfs_name = "stopcopy",
		.type.pretty_name = "ferry migration (STOP_COPY)",
		.migration_flags = VFIO_MIGRATION_STOP_COPY,
	},
#if FM_PRECOPY
	{
		.type.sysfs_name = "precopy",
		.type.pretty_name = "ferry migration (STOP_COPY, P2P, PRE_COPY)",
		.migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P |
				   VFIO_MIGRATION_PRE_COPY,
	},
	{
		.type.sysfs_name = "precopy-nop2p",
		.type.pretty_name = "ferry migration (STOP_COPY, PRE_COPY)",
		.migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
	},
#endif
};

static struct mdev_type *fm_mdev_types[ARRAY_SIZE(fm_types)];

static void fm_parent_release(struct device *dev)
{
}

static struct class *fm_class_create(void)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	return class_create(FM_NAME);
#else
	return class_create(THIS_MODULE, FM_NAME);
#endif
}

static int __init fm_init(void)
{
	int ret, i;

	for (i = 0; i < ARRAY_SIZE(fm_types); i++)
		fm_mdev_types[i] = &fm_types[i].type;
	ret = mdev_register_driver(&fm_driver);
	if (ret)
		return ret;

	fm_parent.class = fm_class_create();
	if (IS_ERR(fm_parent.class)) {
		ret = PTR_ERR(fm_parent.class);
		goto err_driver;
	}
	fm_parent.dev.class = fm_parent.class;
	fm_parent.dev.release = fm_parent_release;
	dev_set_name(&fm_parent.dev, "%s", FM_NAME);
	ret = device_register(&fm_parent.dev);
	if (ret) {
		put_device(&fm_parent.dev);
		goto err_class;
	}
	ret = mdev_register_parent(&fm_parent.parent, &fm_parent.dev,
				   &fm_driver, fm_mdev_types,
				   ARRAY_SIZE(fm_mdev_types));
	if (ret)
		goto err_device;
	pr_info(FM_NAME ": loaded, state_size %lu, %zu types\n", state_size,
		ARRAY_SIZE(fm_types));
	return 0;

err_device:
	device_unregister(&fm_parent.dev);
err_class:
	class_destroy(fm_parent.class);
err_driver:
	mdev_unregister_driver(&fm_driver);
	return ret;
}

static void __exit fm_exit(void)
{
	mdev_unregister_parent(&fm_parent.parent);
	device_unregister(&fm_parent.dev);
	class_destroy(fm_parent.class);
	mdev_unregister_driver(&fm_driver);
}

module_init(fm_init);
module_exit(fm_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Emulated VFIO mdev device with live migration, for Ferry's tests");
MODULE_AUTHOR("The Ferry authors");
