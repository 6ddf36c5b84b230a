package wire

import (
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
)

// MaxWindowChunks and MaxWindowBytes bound the window a destination may
// advertise for one device, beyond its acknowledged frontier. The source
// keeps every chunk it sent until it is acknowledged, so its memory per
// device is bounded by what it lets a destination's window admit: a
// destination (a buggy or hostile one) cannot make a source read a whole
// device into memory. A destination's --max-buffers and --max-buffer-bytes
// must stay within them.
const (
	MaxWindowChunks = flow.MaxWindowChunks
	MaxWindowBytes  = 1 << 30
)

// CheckWindowUpdate checks a window update from a destination before the
// source applies it to one of its devices streams: the device exists, the
// acknowledged frontier is within the window, and the window reaches at
// most MaxWindowChunks and MaxWindowBytes beyond the frontier. An error is
// INTERNAL with BAD_WINDOW_UPDATE: the destination broke the protocol.
func CheckWindowUpdate(w *ferryv1.WindowUpdate, devices int) error {
	dev := w.GetDevice()
	switch {
	case uint64(dev) >= uint64(devices):
		return Errorf(codes.Internal, ReasonBadWindow, "the destination sent a window for device %d of %d", dev, devices)
	case w.GetAckedSeq() > w.GetLimitSeq() || w.GetAckedOffset() > w.GetLimitOffset():
		return Errorf(codes.Internal, ReasonBadWindow, "device %d: the destination acknowledged (seq %d, byte %d) beyond its window (seq %d, byte %d)",
			dev, w.GetAckedSeq(), w.GetAckedOffset(), w.GetLimitSeq(), w.GetLimitOffset())
	case w.GetLimitSeq()-w.GetAckedSeq() > MaxWindowChunks || w.GetLimitOffset()-w.GetAckedOffset() > MaxWindowBytes:
		return Errorf(codes.Internal, ReasonBadWindow, "device %d: a window of %d chunks and %d bytes beyond the acknowledged frontier; a source admits at most %d and %d",
			dev, w.GetLimitSeq()-w.GetAckedSeq(), w.GetLimitOffset()-w.GetAckedOffset(), MaxWindowChunks, MaxWindowBytes)
	}
	return nil
}

// CheckOpenWindows checks the initial windows an OpenResponse carries: one
// per device, in order, each valid as CheckWindowUpdate says, starting at
// the beginning of the stream and wide enough for one chunk of chunkSize
// (or no chunk would ever be admitted).
func CheckOpenWindows(ws []*ferryv1.WindowUpdate, devices int, chunkSize uint32) error {
	if len(ws) != devices {
		return Errorf(codes.Internal, ReasonBadWindow, "the destination sent %d windows for %d devices", len(ws), devices)
	}
	for i, w := range ws {
		if err := CheckWindowUpdate(w, devices); err != nil {
			return err
		}
		switch {
		case int(w.GetDevice()) != i:
			return Errorf(codes.Internal, ReasonBadWindow, "initial window %d is for device %d", i, w.GetDevice())
		case w.GetAckedSeq() != 0 || w.GetAckedOffset() != 0:
			return Errorf(codes.Internal, ReasonBadWindow, "device %d: the initial window acknowledges (seq %d, byte %d) before anything was sent", i, w.GetAckedSeq(), w.GetAckedOffset())
		case w.GetLimitSeq() == 0 || w.GetLimitOffset() < uint64(chunkSize):
			return Errorf(codes.Internal, ReasonBadWindow, "device %d: an initial window of %d chunks and %d bytes admits no chunk of %d bytes", i, w.GetLimitSeq(), w.GetLimitOffset(), chunkSize)
		}
	}
	return nil
}
