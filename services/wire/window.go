package wire

import (
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
)

// MaxWindowChunks and MaxWindowBytes bound the window a destination may
// advertise for one device, beyond the frontier it acknowledges. The source
// keeps every chunk it sent until the destination acknowledges its seq, so
// what it holds for a device is at most MaxWindowChunks chunks: the
// acknowledged seq is checked against what the source sent, and the window
// against that seq (see CheckWindowUpdate). The byte bound limits how far
// past what it has sent the source may read; the bytes it holds are
// bounded by its own memory budget, since the byte offset a destination
// acknowledges cannot be checked against its seq here. A destination's
// --max-buffers and --max-buffer-bytes must stay within them.
const (
	MaxWindowChunks = flow.MaxWindowChunks
	MaxWindowBytes  = 1 << 30
)

// Frontier is a position in a device's stream: the seq and the byte offset
// of a chunk, which are the number of chunks and of bytes before it. The
// source's sent frontier is that of the next chunk it will send.
type Frontier struct {
	Seq, Offset uint64
}

// CheckWindowUpdate checks a window update from a destination before the
// source applies it to one of its devices' streams: the device is one of
// devices; the acknowledged frontier is within the window and within what
// the source has sent on that device, sent(device) (called only for a
// device in range, and one consistent reading of the seq and offset, as
// of now or later than the update was made); and the window reaches at
// most MaxWindowChunks and MaxWindowBytes beyond the acknowledged
// frontier. So a window the source accepts never admits more than
// MaxWindowChunks chunks past the newest seq it has had acknowledged, and
// never more than MaxWindowBytes past what it has sent. An error is
// INTERNAL with BAD_WINDOW_UPDATE: the destination broke the protocol.
func CheckWindowUpdate(w *ferryv1.WindowUpdate, devices int, sent func(device int) Frontier) error {
	dev := w.GetDevice()
	if uint64(dev) >= uint64(devices) {
		return Errorf(codes.Internal, ReasonBadWindow, "the destination sent a window for device %d of %d", dev, devices)
	}
	s := sent(int(dev))
	switch {
	case w.GetAckedSeq() > w.GetLimitSeq() || w.GetAckedOffset() > w.GetLimitOffset():
		return Errorf(codes.Internal, ReasonBadWindow, "device %d: the destination acknowledged (seq %d, byte %d) beyond its window (seq %d, byte %d)",
			dev, w.GetAckedSeq(), w.GetAckedOffset(), w.GetLimitSeq(), w.GetLimitOffset())
	case w.GetAckedSeq() > s.Seq || w.GetAckedOffset() > s.Offset:
		return Errorf(codes.Internal, ReasonBadWindow, "device %d: the destination acknowledged (seq %d, byte %d) beyond what was sent (seq %d, byte %d)",
			dev, w.GetAckedSeq(), w.GetAckedOffset(), s.Seq, s.Offset)
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
	nothing := func(int) Frontier { return Frontier{} }
	for i, w := range ws {
		// Nothing is sent yet: an initial window acknowledges nothing.
		if err := CheckWindowUpdate(w, devices, nothing); err != nil {
			return err
		}
		switch {
		case int(w.GetDevice()) != i:
			return Errorf(codes.Internal, ReasonBadWindow, "initial window %d is for device %d", i, w.GetDevice())
		case w.GetLimitSeq() == 0 || w.GetLimitOffset() < uint64(chunkSize):
			return Errorf(codes.Internal, ReasonBadWindow, "device %d: an initial window of %d chunks and %d bytes admits no chunk of %d bytes", i, w.GetLimitSeq(), w.GetLimitOffset(), chunkSize)
		}
	}
	return nil
}
