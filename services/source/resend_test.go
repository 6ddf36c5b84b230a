package source

import (
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// requeue takes back every unacknowledged chunk the lost channel sent,
// and only those, counts them as retransmitted, and never blocks however
// many there are; the queue hands them out oldest first and its drain
// drops their references.
func TestRequeueAndResendAccounting(t *testing.T) {
	d := &srcDevice{}
	m := &migration{devs: []*srcDevice{d}}
	const n = 10000 // far beyond any queue sized from a first window
	for i := range n {
		c := d.chunk()
		c.hdr = ferryv1.ChannelRequest{Seq: uint64(i)}
		c.channel.Store(int32(i % 2))
		d.keep(c)
		c.release() // the send queue's reference: sent
	}
	d.ack(100) // chunks 0-99 were written at the destination
	q := newResendQueue()
	if got := m.requeue(1, q); got != (n-100)/2 {
		t.Fatalf("requeued %d chunks of channel 1, want %d", got, (n-100)/2)
	}
	if got := d.retrans.Load(); got != (n-100)/2 {
		t.Errorf("retransmitted %d, want %d", got, (n-100)/2)
	}
	if got := m.requeue(1, q); got != 0 {
		t.Errorf("a second requeue of the same channel took %d chunks, want 0 (they now belong to no channel)", got)
	}
	select {
	case <-q.wait():
	default:
		t.Fatal("the queue holds chunks but does not say so")
	}
	first := q.pop()
	if first == nil || first.hdr.GetSeq() != 101 || first.refs.Load() != 2 {
		t.Fatalf("first resend %v, want seq 101 with the unacked list's and the queue's references", first)
	}
	first.release()
	q.drain()
	if q.len() != 0 || q.pop() != nil {
		t.Error("the queue is not empty after its drain")
	}
	d.ack(^uint64(0))
	if len(d.unacked) != 0 || len(d.free) != n {
		t.Errorf("%d chunks still unacked and %d recycled after everything was acknowledged, want 0 and %d", len(d.unacked), len(d.free), n)
	}
}
