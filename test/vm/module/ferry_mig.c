// SPDX-License-Identifier: GPL-2.0
/*
 * ferry_mig - an emulated mdev VFIO device that implements VFIO live
 * migration (protocol v2: STOP_COPY, optionally P2P) for Linux 6.1.
 *
 * It exists so that Ferry's Linux backend (pkg/vfio) can be tested against
 * the kernel's real VFIO core: the container/group path, the
 * VFIO_DEVICE_FEATURE ioctls, the kernel's own state walker
 * (vfio_mig_get_next_state) and real data_fd files.
 *
 * Device model
 *   Each instance has a state of state_size bytes (module parameter, read
 *   when the instance is created) whose content is a pure function of a
 *   64-bit seed: payload word i is splitmix64(seed + (i + 1) * golden).
 *   A new instance's seed is derived from its UUID, so every instance has
 *   different, reproducible content.
 *
 * Migration stream (what the STOP_COPY data_fd yields)
 *   A 64-byte header (struct fm_header, little endian) followed by the
 *   payload words. Writes in RESUMING may be chunked arbitrarily; every
 *   byte is compared against the generator as it arrives, and
 *   RESUMING->STOP fails with EINVAL (the device stays in RESUMING) unless
 *   the header is valid, the payload size matches this instance, exactly
 *   the whole stream was written and every byte matched. On success the
 *   instance adopts the source's seed: its state is now the source's.
 *
 * sysfs (in /sys/bus/mdev/devices/<uuid>/migration/)
 *   state         current migration state by name (RUNNING, STOP, ...)
 *   seed          seed of the current state content (hex)
 *   size          state payload size in bytes
 *   flags         migration flags (1 = STOP_COPY, 3 = STOP_COPY|P2P)
 *   trace         arcs the last VFIO_DEVICE_FEATURE SET walked, as
 *                 "from>to" state numbers, then "= errno" (0 on success)
 *   corrupt       stream byte offset that the next save streams flip, or
 *                 -1 (default, off); write -1 to turn it off again
 *   last_error    why the last RESUMING->STOP failed (empty when it did not)
 *   inject_error  write 1 to put the device in ERROR (left only by reset)
 *
 * mdev types (in /sys/class/mdev_bus/ferry_mig/mdev_supported_types/)
 *   ferry_mig-p2p       migration flags STOP_COPY | P2P
 *   ferry_mig-stopcopy  migration flags STOP_COPY
 */

#include <linux/anon_inodes.h>
#include <linux/device.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/mdev.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vfio.h>

#define FM_NAME "ferry_mig"
#define FM_MAGIC 0x47494d5952524546ULL /* "FERRYMIG" little endian */
#define FM_VERSION 1
#define FM_BUF_SIZE (64 * 1024)
#define FM_MAX_INSTANCES 16
#define FM_TRACE_MAX 8

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
	__le32 reserved0;
	u8 uuid[16];		/* the source instance, for the log */
	__le64 reserved1;
} __packed;

static_assert(sizeof(struct fm_header) == 64);

struct fm_type {
	struct mdev_type type;
	u32 migration_flags;
};

/* One instance. state_lock guards every field below it. */
struct fm_dev {
	struct vfio_device vdev;
	struct mdev_device *mdev;

	struct mutex state_lock;
	enum vfio_device_mig_state mig_state;
	u64 seed;
	u64 size;
	s64 corrupt;			/* stream offset to flip, -1 = off */
	struct file *save;		/* our reference on the STOP_COPY file */
	struct file *resume;		/* our reference on the RESUMING file */
	char last_error[96];

	/* The arcs of the last SET request, for the trace attribute. */
	u8 trace_from[FM_TRACE_MAX];
	u8 trace_to[FM_TRACE_MAX];
	int trace_len;
	int trace_errno;
};

/*
 * One data_fd. The file never touches its fm_dev after creation: what it
 * needs is copied in, so it may outlive the device. lock guards all fields.
 */
struct fm_file {
	struct mutex lock;
	bool disabled;			/* session ended: I/O gives ENODEV */
	u64 pos;			/* stream bytes read or written */
	u64 total;			/* header + payload */
	u8 *buf;			/* FM_BUF_SIZE bounce buffer */

	/* Saving: what to emit. */
	struct fm_header hdr;
	s64 corrupt;

	/* Resuming: what the destination has learnt so far. */
	u64 expect_size;		/* this instance's payload size */
	bool hdr_ok;
	u64 seed;			/* from the header once hdr_ok */
	s64 bad_offset;			/* first mismatching byte, -1 = none */
	char reason[64];
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
};

static u64 fm_mix(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* fm_word is payload word i of the state with the given seed. */
static u64 fm_word(u64 seed, u64 i)
{
	return fm_mix(seed + (i + 1) * 0x9e3779b97f4a7c15ULL);
}

/* fm_fill writes payload bytes [off, off+len) of seed's state into dst. */
static void fm_fill(u8 *dst, u64 seed, u64 off, size_t len)
{
	while (len) {
		u64 i = off / 8, shift = off % 8;
		__le64 w = cpu_to_le64(fm_word(seed, i));
		size_t n = min_t(size_t, len, 8 - shift);

		memcpy(dst, (u8 *)&w + shift, n);
		dst += n;
		off += n;
		len -= n;
	}
}

/* fm_check compares src with payload bytes [off, off+len) of seed's state
 * and returns the payload offset of the first difference, or -1. */
static s64 fm_check(const u8 *src, u64 seed, u64 off, size_t len)
{
	while (len) {
		u64 i = off / 8, shift = off % 8;
		__le64 w = cpu_to_le64(fm_word(seed, i));
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

/* ---- data_fd files ---------------------------------------------------- */

static int fm_file_release(struct inode *inode, struct file *filp)
{
	struct fm_file *f = filp->private_data;

	kfree(f->buf);
	mutex_destroy(&f->lock);
	kfree(f);
	return 0;
}

static ssize_t fm_save_read(struct file *filp, char __user *ubuf, size_t len,
			    loff_t *ppos)
{
	struct fm_file *f = filp->private_data;
	ssize_t done = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&f->lock);
	if (f->disabled) {
		done = -ENODEV;
		goto out;
	}
	while (len && f->pos < f->total) {
		size_t n = min3(len, (size_t)FM_BUF_SIZE,
				(size_t)(f->total - f->pos));
		u64 end = f->pos + n;

		if (f->pos < sizeof(f->hdr)) {
			n = min_t(size_t, n, sizeof(f->hdr) - f->pos);
			end = f->pos + n;
			memcpy(f->buf, (u8 *)&f->hdr + f->pos, n);
		} else {
			fm_fill(f->buf, le64_to_cpu(f->hdr.seed),
				f->pos - sizeof(f->hdr), n);
		}
		if (f->corrupt >= 0 && f->corrupt >= f->pos && f->corrupt < end)
			f->buf[f->corrupt - f->pos] ^= 0xff;
		if (copy_to_user(ubuf + done, f->buf, n)) {
			if (!done)
				done = -EFAULT;
			goto out;
		}
		f->pos += n;
		done += n;
		len -= n;
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
out:
	mutex_unlock(&f->lock);
	return done;
}

/* fm_resume_consume checks n stream bytes at f->pos held in f->buf. */
static void fm_resume_consume(struct fm_file *f, size_t n)
{
	const u8 *p = f->buf;

	if (f->pos < sizeof(f->hdr)) {
		size_t h = min_t(size_t, n, sizeof(f->hdr) - f->pos);

		memcpy((u8 *)&f->hdr + f->pos, p, h);
		f->pos += h;
		p += h;
		n -= h;
		if (f->pos < sizeof(f->hdr))
			return;
		if (le64_to_cpu(f->hdr.magic) != FM_MAGIC ||
		    le32_to_cpu(f->hdr.version) != FM_VERSION ||
		    le32_to_cpu(f->hdr.header_size) != sizeof(f->hdr)) {
			snprintf(f->reason, sizeof(f->reason), "bad header");
		} else if (le64_to_cpu(f->hdr.payload_size) != f->expect_size) {
			snprintf(f->reason, sizeof(f->reason),
				 "payload size %llu, want %llu",
				 le64_to_cpu(f->hdr.payload_size),
				 f->expect_size);
		} else {
			f->hdr_ok = true;
			f->seed = le64_to_cpu(f->hdr.seed);
		}
	}
	if (n && f->hdr_ok && f->bad_offset < 0) {
		u64 off = f->pos - sizeof(f->hdr);
		s64 bad = fm_check(p, f->seed, off, n);

		if (bad >= 0)
			f->bad_offset = bad + sizeof(f->hdr);
	}
	f->pos += n;
}

static ssize_t fm_resume_write(struct file *filp, const char __user *ubuf,
			       size_t len, loff_t *ppos)
{
	struct fm_file *f = filp->private_data;
	ssize_t done = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&f->lock);
	if (f->disabled) {
		done = -ENODEV;
		goto out;
	}
	if (len > f->total - f->pos) {
		/* More than a whole state: like mlx5 and mtty, refuse it. */
		done = -ENOMEM;
		goto out;
	}
	while (len) {
		size_t n = min_t(size_t, len, FM_BUF_SIZE);

		if (copy_from_user(f->buf, ubuf + done, n)) {
			if (!done)
				done = -EFAULT;
			goto out;
		}
		fm_resume_consume(f, n);
		done += n;
		len -= n;
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
out:
	mutex_unlock(&f->lock);
	return done;
}

static const struct file_operations fm_save_fops = {
	.owner = THIS_MODULE,
	.read = fm_save_read,
	.release = fm_file_release,
	.llseek = no_llseek,
};

static const struct file_operations fm_resume_fops = {
	.owner = THIS_MODULE,
	.write = fm_resume_write,
	.release = fm_file_release,
	.llseek = no_llseek,
};

/* fm_file_open makes a data_fd file; the caller gets two references: one
 * for the VFIO core to install as the user's fd, one for the device. */
static struct file *fm_file_open(struct fm_dev *fm, bool save)
{
	struct fm_file *f;
	struct file *filp;

	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return ERR_PTR(-ENOMEM);
	f->buf = kmalloc(FM_BUF_SIZE, GFP_KERNEL);
	if (!f->buf) {
		kfree(f);
		return ERR_PTR(-ENOMEM);
	}
	mutex_init(&f->lock);
	f->total = sizeof(f->hdr) + fm->size;
	f->bad_offset = -1;
	f->expect_size = fm->size;
	f->corrupt = -1;
	if (save) {
		f->hdr.magic = cpu_to_le64(FM_MAGIC);
		f->hdr.version = cpu_to_le32(FM_VERSION);
		f->hdr.header_size = cpu_to_le32(sizeof(f->hdr));
		f->hdr.seed = cpu_to_le64(fm->seed);
		f->hdr.payload_size = cpu_to_le64(fm->size);
		f->hdr.flags = cpu_to_le32(fm->vdev.migration_flags);
		export_guid(f->hdr.uuid, &fm->mdev->uuid);
		f->corrupt = fm->corrupt;
	}

	filp = anon_inode_getfile(save ? "[ferry_mig-save]" : "[ferry_mig-resume]",
				  save ? &fm_save_fops : &fm_resume_fops, f,
				  save ? O_RDONLY : O_WRONLY);
	if (IS_ERR(filp)) {
		kfree(f->buf);
		kfree(f);
		return filp;
	}
	stream_open(filp->f_inode, filp);
	get_file(filp);
	return filp;
}

/* fm_file_end ends a session: the user's fd now fails with ENODEV. */
static void fm_file_end(struct file **slot)
{
	struct fm_file *f;

	if (!*slot)
		return;
	f = (*slot)->private_data;
	mutex_lock(&f->lock);
	f->disabled = true;
	mutex_unlock(&f->lock);
	fput(*slot);
	*slot = NULL;
}

static void fm_end_sessions(struct fm_dev *fm)
{
	fm_file_end(&fm->save);
	fm_file_end(&fm->resume);
}

/* fm_load validates the RESUMING stream and, if it is whole and exact,
 * makes it this device's state. Called with state_lock held. */
static int fm_load(struct fm_dev *fm)
{
	struct fm_file *f;
	int ret = 0;

	if (WARN_ON(!fm->resume))	/* RESUMING always has its file */
		return -EINVAL;
	f = fm->resume->private_data;
	mutex_lock(&f->lock);
	if (f->reason[0])
		snprintf(fm->last_error, sizeof(fm->last_error), "%s", f->reason);
	else if (f->pos != f->total)
		snprintf(fm->last_error, sizeof(fm->last_error),
			 "short stream: %llu of %llu bytes", f->pos, f->total);
	else if (f->bad_offset >= 0)
		snprintf(fm->last_error, sizeof(fm->last_error),
			 "mismatch at stream byte %lld", f->bad_offset);
	else
		fm->last_error[0] = 0;

	if (fm->last_error[0]) {
		dev_info(&fm->mdev->dev, "RESUMING->STOP refused: %s\n",
			 fm->last_error);
		ret = -EINVAL;
	} else {
		fm->seed = f->seed;
		dev_info(&fm->mdev->dev, "loaded state seed %016llx from %pUl\n",
			 fm->seed, f->hdr.uuid);
	}
	mutex_unlock(&f->lock);
	return ret;
}

/* fm_arc performs one arc of the FSM from fm->mig_state to next. */
static struct file *fm_arc(struct fm_dev *fm, enum vfio_device_mig_state next)
{
	enum vfio_device_mig_state cur = fm->mig_state;
	struct file *filp;
	int ret;

	if (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_STOP_COPY) {
		filp = fm_file_open(fm, true);
		if (!IS_ERR(filp))
			fm->save = filp;
		return filp;
	}
	if (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_RESUMING) {
		filp = fm_file_open(fm, false);
		if (!IS_ERR(filp))
			fm->resume = filp;
		return filp;
	}
	if (cur == VFIO_DEVICE_STATE_STOP_COPY && next == VFIO_DEVICE_STATE_STOP) {
		fm_file_end(&fm->save);
		return NULL;
	}
	if (cur == VFIO_DEVICE_STATE_RESUMING && next == VFIO_DEVICE_STATE_STOP) {
		ret = fm_load(fm);
		if (ret)
			return ERR_PTR(ret);
		fm_file_end(&fm->resume);
		return NULL;
	}
	/* Arcs between RUNNING, RUNNING_P2P and STOP: nothing to quiesce. */
	if ((cur == VFIO_DEVICE_STATE_RUNNING && next == VFIO_DEVICE_STATE_RUNNING_P2P) ||
	    (cur == VFIO_DEVICE_STATE_RUNNING_P2P && next == VFIO_DEVICE_STATE_RUNNING) ||
	    (cur == VFIO_DEVICE_STATE_RUNNING_P2P && next == VFIO_DEVICE_STATE_STOP) ||
	    (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_RUNNING_P2P) ||
	    (cur == VFIO_DEVICE_STATE_RUNNING && next == VFIO_DEVICE_STATE_STOP) ||
	    (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_RUNNING))
		return NULL;

	/* vfio_mig_get_next_state never asks for anything else. */
	WARN_ON(true);
	return ERR_PTR(-EINVAL);
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
	if (fm->mig_state == VFIO_DEVICE_STATE_ERROR) {
		/* Only a reset leaves ERROR; the core helper would WARN. */
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
		if (fm->trace_len < FM_TRACE_MAX) {
			fm->trace_from[fm->trace_len] = fm->mig_state;
			fm->trace_to[fm->trace_len] = next;
			fm->trace_len++;
		}
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

static const struct vfio_migration_ops fm_mig_ops = {
	.migration_set_state = fm_set_state,
	.migration_get_state = fm_get_state,
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
	mutex_init(&fm->state_lock);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
	fm->size = max(8UL, round_down(READ_ONCE(state_size), 8UL));
	fm->corrupt = -1;
	for (i = 0; i < 16; i++)
		seed = fm_mix(seed ^ (u64)mdev->uuid.b[i] << (8 * (i % 8)));
	fm->seed = seed;

	vdev->migration_flags = type->migration_flags;
	vdev->mig_ops = &fm_mig_ops;
	return 0;
}

static void fm_release_dev(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_destroy(&fm->state_lock);
	atomic_inc(&fm_available);
	vfio_free_device(vdev);
}

static int fm_open_device(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	mutex_lock(&fm->state_lock);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
	mutex_unlock(&fm->state_lock);
	return 0;
}

static void fm_close_device(struct vfio_device *vdev)
{
	struct fm_dev *fm = container_of(vdev, struct fm_dev, vdev);

	/* The sessions must end before close_device returns. */
	mutex_lock(&fm->state_lock);
	fm_end_sessions(fm);
	fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
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
		fm_end_sessions(fm);
		fm->mig_state = VFIO_DEVICE_STATE_RUNNING;
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

static ssize_t size_show(struct device *dev, struct device_attribute *attr,
			 char *buf)
{
	return sysfs_emit(buf, "%llu\n", fm_from_dev(dev)->size);
}
static DEVICE_ATTR_RO(size);

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

static struct attribute *fm_dev_attrs[] = {
	&dev_attr_state.attr,
	&dev_attr_seed.attr,
	&dev_attr_size.attr,
	&dev_attr_flags.attr,
	&dev_attr_trace.attr,
	&dev_attr_corrupt.attr,
	&dev_attr_last_error.attr,
	&dev_attr_inject_error.attr,
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
	dev_info(&mdev->dev, "flags %u, state %llu bytes, seed %016llx\n",
		 fm->vdev.migration_flags, fm->size, fm->seed);
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
};

static struct mdev_type *fm_mdev_types[] = {
	&fm_types[0].type,
	&fm_types[1].type,
};

static void fm_parent_release(struct device *dev)
{
}

static int __init fm_init(void)
{
	int ret;

	ret = mdev_register_driver(&fm_driver);
	if (ret)
		return ret;

	fm_parent.class = class_create(THIS_MODULE, FM_NAME);
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
	pr_info(FM_NAME ": loaded, state_size %lu\n", state_size);
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
