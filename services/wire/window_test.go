package wire

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
)

func TestCheckWindowUpdate(t *testing.T) {
	ok := []*ferryv1.WindowUpdate{
		{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20},
		{Device: 2, LimitSeq: 100, LimitOffset: 1 << 40, AckedSeq: 36, AckedOffset: 1<<40 - 64<<20},
		{Device: 1, LimitSeq: MaxWindowChunks, LimitOffset: MaxWindowBytes},
		{Device: 1, LimitSeq: 5, LimitOffset: 7, AckedSeq: 5, AckedOffset: 7}, // a full window
	}
	for _, w := range ok {
		if err := CheckWindowUpdate(w, 3); err != nil {
			t.Errorf("%v: %v", w, err)
		}
	}
	bad := []*ferryv1.WindowUpdate{
		{Device: 3, LimitSeq: 1, LimitOffset: 1},
		{Device: 1<<32 - 1, LimitSeq: 1, LimitOffset: 1},
		{LimitSeq: 4, LimitOffset: 1 << 20, AckedSeq: 5},
		{LimitSeq: 4, LimitOffset: 1 << 20, AckedOffset: 1<<20 + 1},
		{LimitSeq: MaxWindowChunks + 1, LimitOffset: 1},
		{LimitSeq: 1, LimitOffset: MaxWindowBytes + 1},
		{LimitSeq: 1<<64 - 1, LimitOffset: 1<<64 - 1},
	}
	for _, w := range bad {
		if err := CheckWindowUpdate(w, 3); Code(err) != codes.Internal || Reason(err) != ReasonBadWindow {
			t.Errorf("%v: %v, want INTERNAL %s", w, err, ReasonBadWindow)
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
// and applies the accepted ones to the devices' gates, as the source does.
// Nothing panics, refusals carry a reason, and the window the gates admit
// never reaches more than MaxWindowChunks and MaxWindowBytes beyond the
// highest acknowledged frontier: what the source holds unacknowledged is
// bounded whatever the destination sends.
func FuzzWindowUpdate(f *testing.F) {
	for _, r := range []*ferryv1.ChannelResponse{
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20}, {Device: 1, LimitSeq: 64, LimitOffset: 64 << 20}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 70, LimitOffset: 70 << 20, AckedSeq: 6, AckedOffset: 6 << 20}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 1, LimitSeq: 1 << 40, LimitOffset: 1 << 62}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 2, LimitSeq: 1, LimitOffset: 1}}},
		{Windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 3, AckedSeq: 9}}},
		{},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, b)
	}
	f.Fuzz(func(t *testing.T, first, second []byte) {
		const devices = 2
		var gates [devices]*flow.Gate
		var ackedSeq, ackedOffset [devices]uint64
		for i := range gates {
			gates[i] = flow.NewGate(flow.Window{LimitSeq: 64, LimitOffset: 64 << 20})
		}
		for _, b := range [][]byte{first, second} {
			var resp ferryv1.ChannelResponse
			if err := proto.Unmarshal(b, &resp); err != nil {
				continue
			}
			for _, w := range resp.GetWindows() {
				if err := CheckWindowUpdate(w, devices); err != nil {
					if Code(err) != codes.Internal || Reason(err) != ReasonBadWindow {
						t.Fatalf("refusal %v", err)
					}
					continue
				}
				d := w.GetDevice()
				gates[d].Update(flow.Window{LimitSeq: w.GetLimitSeq(), LimitOffset: w.GetLimitOffset()})
				ackedSeq[d] = max(ackedSeq[d], w.GetAckedSeq())
				ackedOffset[d] = max(ackedOffset[d], w.GetAckedOffset())
				win := gates[d].Window()
				// The initial window (64 chunks, 64 MiB) is within the
				// bounds too.
				if win.LimitSeq-ackedSeq[d] > MaxWindowChunks && win.LimitSeq > 64 ||
					win.LimitOffset-ackedOffset[d] > MaxWindowBytes && win.LimitOffset > 64<<20 {
					t.Fatalf("device %d: window %+v beyond acknowledged (%d, %d)", d, win, ackedSeq[d], ackedOffset[d])
				}
			}
		}
	})
}
