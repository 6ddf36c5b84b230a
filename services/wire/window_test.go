package wire

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
)

func TestCheckWindowUpdate(t *testing.T) {
	// What the source has sent on each of its 3 devices.
	sentTo := [3]Frontier{{Seq: 64, Offset: 64 << 20}, {Seq: 5, Offset: 7}, {Seq: 40, Offset: 1 << 40}}
	sent := func(d int) Frontier { return sentTo[d] }
	ok := []*ferryv1.WindowUpdate{
		{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20},
		{Device: 2, LimitSeq: 100, LimitOffset: 1 << 40, AckedSeq: 36, AckedOffset: 1<<40 - 64<<20},
		{Device: 1, LimitSeq: MaxWindowChunks, LimitOffset: MaxWindowBytes},
		{Device: 1, LimitSeq: 5, LimitOffset: 7, AckedSeq: 5, AckedOffset: 7},                                  // a full window, all acknowledged
		{Device: 0, LimitSeq: 64 + MaxWindowChunks, LimitOffset: 1 << 30, AckedSeq: 64, AckedOffset: 64 << 20}, // the widest window past what was sent
	}
	for _, w := range ok {
		if err := CheckWindowUpdate(w, 3, sent); err != nil {
			t.Errorf("%v: %v", w, err)
		}
	}
	bad := map[string]*ferryv1.WindowUpdate{
		"no such device":               {Device: 3, LimitSeq: 1, LimitOffset: 1},
		"device far out of range":      {Device: 1<<32 - 1, LimitSeq: 1, LimitOffset: 1},
		"acked seq beyond the window":  {LimitSeq: 4, LimitOffset: 1 << 20, AckedSeq: 5},
		"acked byte beyond the window": {LimitSeq: 4, LimitOffset: 1 << 20, AckedOffset: 1<<20 + 1},
		"too many chunks":              {LimitSeq: MaxWindowChunks + 1, LimitOffset: 1},
		"too many bytes":               {LimitSeq: 1, LimitOffset: MaxWindowBytes + 1},
		"everything":                   {LimitSeq: 1<<64 - 1, LimitOffset: 1<<64 - 1},
		// Acknowledging what was never sent would widen the window past
		// what the source frees: 2^20 chunks beyond seq 1000 while the
		// source holds every chunk from seq 64.
		"acked seq beyond what was sent":  {Device: 0, LimitSeq: 1000 + MaxWindowChunks, LimitOffset: 1 << 30, AckedSeq: 1000, AckedOffset: 64 << 20},
		"acked byte beyond what was sent": {Device: 1, LimitSeq: 6, LimitOffset: 1 << 30, AckedSeq: 5, AckedOffset: 8},
		"acked one past what was sent":    {Device: 1, LimitSeq: 6, LimitOffset: 8, AckedSeq: 6, AckedOffset: 7},
	}
	for name, w := range bad {
		if err := CheckWindowUpdate(w, 3, sent); Code(err) != codes.Internal || Reason(err) != ReasonBadWindow {
			t.Errorf("%s: %v: %v, want INTERNAL %s", name, w, err, ReasonBadWindow)
		}
	}
}

func TestCheckOpenWindows(t *testing.T) {
	good := []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 8, LimitOffset: 1 << 20}, {Device: 1, LimitSeq: 8, LimitOffset: 1 << 20}}
	if err := CheckOpenWindows(good, 2, 1<<20); err != nil {
		t.Fatal(err)
	}
	for name, ws := range map[string][]*ferryv1.WindowUpdate{
		"one window for two devices": good[:1],
		"devices out of order":       {good[1], good[0]},
		"already acknowledged":       {good[0], {Device: 1, LimitSeq: 9, LimitOffset: 2 << 20, AckedSeq: 1, AckedOffset: 1 << 20}},
		"narrower than a chunk":      {good[0], {Device: 1, LimitSeq: 8, LimitOffset: 1<<20 - 1}},
		"no chunk at all":            {good[0], {Device: 1, LimitOffset: 1 << 20}},
	} {
		if err := CheckOpenWindows(ws, 2, 1<<20); Reason(err) != ReasonBadWindow {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// FuzzWindowUpdate decodes ChannelResponses from arbitrary bytes, as a
// source receives them, checks every window update with CheckWindowUpdate
// against what a model source has sent, and applies the accepted ones to
// the devices' gates and acknowledged frontiers, as the source does;
// between messages the model sends part of what its windows admit. Nothing
// panics, refusals carry a reason, and an accepted update never
// acknowledges past what was sent; the window the gates admit never
// reaches more than MaxWindowChunks beyond the newest acknowledged seq
// (the source frees chunks by seq, so it holds at most that many), nor
// more than MaxWindowBytes beyond what was sent.
func FuzzWindowUpdate(f *testing.F) {
	for _, r := range []*ferryv1.ChannelResponse{
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20}, {Device: 1, LimitSeq: 64, LimitOffset: 64 << 20}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 70, LimitOffset: 70 << 20, AckedSeq: 6, AckedOffset: 6 << 20}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 1, LimitSeq: 1 << 40, LimitOffset: 1 << 62}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 2, LimitSeq: 1, LimitOffset: 1}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 3, AckedSeq: 9}}},
		// Acknowledgements of chunks never sent, with the widest window
		// beyond them.
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 1000 + MaxWindowChunks, LimitOffset: 1<<30 + 1<<20, AckedSeq: 1000, AckedOffset: 1 << 20}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 1, LimitSeq: 10 + MaxWindowChunks, LimitOffset: 1 << 40, AckedSeq: 10, AckedOffset: 1<<40 - 1<<30}}},
		{},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, b, uint8(128))
		f.Add(b, b, uint8(255))
	}
	f.Fuzz(func(t *testing.T, first, second []byte, progress uint8) {
		const devices = 2
		var gates [devices]*flow.Gate
		var sent [devices]Frontier
		var freed [devices]uint64
		for i := range gates {
			gates[i] = flow.NewGate(flow.Window{LimitSeq: 64, LimitOffset: 64 << 20})
		}
		sentTo := func(d int) Frontier {
			if d < 0 || d >= devices {
				t.Fatalf("sent(%d) of %d devices", d, devices)
			}
			return sent[d]
		}
		for _, b := range [][]byte{first, second} {
			// The source sends part of what its windows admit.
			for d, g := range gates {
				win := g.Window()
				sent[d].Seq += (win.LimitSeq - sent[d].Seq) * uint64(progress) / 255
				sent[d].Offset += (win.LimitOffset - sent[d].Offset) * uint64(progress) / 255
			}
			var resp ferryv1.ChannelResponse
			if err := proto.Unmarshal(b, &resp); err != nil {
				continue
			}
			for _, w := range resp.GetWindows() {
				if err := CheckWindowUpdate(w, devices, sentTo); err != nil {
					if Code(err) != codes.Internal || Reason(err) != ReasonBadWindow {
						t.Fatalf("refusal %v", err)
					}
					continue
				}
				d := w.GetDevice()
				if w.GetAckedSeq() > sent[d].Seq || w.GetAckedOffset() > sent[d].Offset {
					t.Fatalf("device %d: accepted an acknowledgement of (%d, %d) with (%d, %d) sent", d, w.GetAckedSeq(), w.GetAckedOffset(), sent[d].Seq, sent[d].Offset)
				}
				gates[d].Update(flow.Window{LimitSeq: w.GetLimitSeq(), LimitOffset: w.GetLimitOffset()})
				// The source frees the chunks below the acknowledged
				// seq: those it sent.
				freed[d] = max(freed[d], min(w.GetAckedSeq(), sent[d].Seq))
				win := gates[d].Window()
				if win.LimitSeq-freed[d] > MaxWindowChunks {
					t.Fatalf("device %d: window %+v admits %d chunks past the freed seq %d", d, win, win.LimitSeq-freed[d], freed[d])
				}
				if win.LimitOffset-sent[d].Offset > MaxWindowBytes && win.LimitOffset > sent[d].Offset {
					t.Fatalf("device %d: window %+v admits %d bytes past the %d sent", d, win, win.LimitOffset-sent[d].Offset, sent[d].Offset)
				}
			}
		}
	})
}
