package dest

import (
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Feedback. A device's loader moves its frontier as it writes; every so
// often (feedbackEvery) it wakes each channel's feedback sender, which
// sends the source every device's window and acknowledged frontier
// (fillWindows). The source frees what was acknowledged and sends into
// the new window.

// wakeFeedback wakes every channel's feedback sender.
func (inc *incoming) wakeFeedback() {
	inc.fbMu.Lock()
	for _, r := range inc.fb {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	inc.fbMu.Unlock()
}

// fillWindows writes the current window of every device into dst, which
// holds one WindowUpdate per device.
func (inc *incoming) fillWindows(dst []*ferryv1.WindowUpdate) {
	for i, d := range inc.devs {
		d.mu.Lock()
		seq, off := d.frontierLocked()
		d.mu.Unlock()
		u := dst[i]
		u.Device, u.LimitSeq, u.LimitOffset, u.AckedSeq, u.AckedOffset = uint32(i),
			satAdd(seq, uint64(inc.limits.MaxChunks)), satAdd(off, inc.limits.MaxBytes), seq, off
	}
}

// feedbackMaxDelay bounds the batching of feedbackEvery in time: a slow
// device writes a quarter window slowly, so the loader also wakes the
// senders when the frontier moved and this long has passed. The source
// hears of progress (and frees its buffers) at least that often, and its
// stall watchdog never takes a slow device for a dead channel.
const feedbackMaxDelay = 100 * time.Millisecond

// feedbackEvery is how far a device's frontier moves before its loader
// wakes the channels' feedback senders, in chunks or in bytes, whichever
// comes first. Each wake-up sends a window update on every channel; one
// per chunk written was N messages per chunk to marshal, write, read,
// unmarshal and apply, with a goroutine wake-up each side (and the garbage
// of a ChannelResponse at the source). A quarter window at a time cuts
// that by MaxChunks/4 and costs no throughput while the window covers the
// round trip, as application credits returned every K/4 messages did when
// the first wave measured raw TCP with credits on this kind of 2-core host
// (docs/performance.md).
//
// With FEATURE_PROMPT_FEEDBACK granted it is a quarter window but at most
// promptFeedbackBytes (and the chunks in it): such a source keeps less
// than the window in flight (services/source/inflight.go), at least
// four times promptFeedbackBytes (or four chunks), and hears of its progress
// often enough to keep that much moving. At 4 MiB a 1-channel migration of 1 MiB chunks
// sends 256 updates per GiB instead of 64.
//
// It cannot stall the stream. A source that waits for credit has sent
// everything the last advertised window (or its own in-flight limit)
// allowed, and the destination writes all of it: when the wait is for
// the count, the frontier moves MaxChunks chunks, or the source's limit
// in chunks (at least everyChunks); when it is for bytes (the source
// waits for room for a whole chunk), it moves more than the window or
// the limit less a chunk (at least everyBytes). END is waited for like
// any chunk; after END the verdict, not a window, is what the source
// waits for, and the loader wakes the senders then anyway.
func feedbackEvery(l flow.Limits, chunkSize uint32, f wire.Features) (chunks, bytes uint64) {
	chunks = max(uint64(l.MaxChunks)/4, 1)
	bytes = max(min(l.MaxBytes/4, l.MaxBytes-uint64(chunkSize)+1), 1)
	if f.Has(ferryv1.Feature_FEATURE_PROMPT_FEEDBACK) {
		bytes = min(bytes, promptFeedbackBytes)
		chunks = min(chunks, max(promptFeedbackBytes/uint64(chunkSize), 1))
	}
	return chunks, bytes
}

// promptFeedbackBytes is how often, at least, a destination that granted
// FEATURE_PROMPT_FEEDBACK wakes its feedback senders.
const promptFeedbackBytes = 4 << 20
