package vmm

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"testing"

	vmmv1 "github.com/vfio-ferry/ferry/api/proto/ferry/vmm/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// pair is two connected ends of a Unix stream socket.
func pair(t *testing.T) (*Conn, *Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "vmm")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return NewConn(c.(*net.UnixConn))
	}
	return conn(fds[0]), conn(fds[1])
}

func attach(name string, blob []byte) *vmmv1.Request {
	return &vmmv1.Request{Id: 7, Op: &vmmv1.Request_Attach{Attach: &vmmv1.Attach{Name: name, ConfigState: blob}}}
}

// TestFramesCarryDescriptors sends frames with and without a
// descriptor, a config state of the largest size among them: each
// arrives whole, with its own descriptor and no other.
func TestFramesCarryDescriptors(t *testing.T) {
	a, b := pair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	big := make([]byte, MaxConfigState)
	big[len(big)-1] = 9
	sent := []struct {
		m  *vmmv1.Request
		fd int
	}{{attach("nic0", []byte("cfg")), int(r.Fd())}, {attach("nic1", big), -1}, {attach("gpu", nil), int(w.Fd())}}
	go func() {
		for _, s := range sent {
			if err := a.Write(s.m, s.fd); err != nil {
				t.Error(err)
			}
		}
	}()
	for _, s := range sent {
		var got vmmv1.Request
		fds, err := b.Read(&got)
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&got, s.m) {
			t.Errorf("frame of %s arrived changed", s.m.GetAttach().GetName())
		}
		if want := s.fd >= 0; (len(fds) == 1) != want || len(fds) > 1 {
			t.Errorf("%s: %d descriptors, want descriptor %v", s.m.GetAttach().GetName(), len(fds), want)
		}
		for _, fd := range fds {
			var st1, st2 unix.Stat_t
			unix.Fstat(fd, &st1)
			unix.Fstat(s.fd, &st2)
			if st1.Ino != st2.Ino {
				t.Errorf("%s: the descriptor is another file's", s.m.GetAttach().GetName())
			}
			if err := CheckVFIODevice(fd); !errors.Is(err, ErrNotVFIODevice) {
				t.Errorf("a pipe passed as a VFIO device: %v", err)
			}
			unix.Close(fd)
		}
	}
}

// TestOversizedFrameRefused checks a length above MaxFrame is refused
// before anything is allocated for it, and a config state above the
// limit cannot be sent.
func TestOversizedFrameRefused(t *testing.T) {
	a, b := pair(t)
	if err := a.Write(attach("x", make([]byte, MaxFrame+1)), -1); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("write of an oversized frame: %v", err)
	}
	go a.Unix().Write(binary.LittleEndian.AppendUint32(nil, 1<<31))
	var m vmmv1.Request
	if _, err := b.Read(&m); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("read of a 2 GiB frame: %v, want ErrFrameTooLarge", err)
	}
}

// TestTooManyDescriptors checks a frame with two descriptors is refused
// and both are closed.
func TestTooManyDescriptors(t *testing.T) {
	a, b := pair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	body, _ := proto.Marshal(attach("two", nil))
	frame := append(binary.LittleEndian.AppendUint32(nil, uint32(len(body))), body...)
	go a.Unix().WriteMsgUnix(frame, unix.UnixRights(int(r.Fd()), int(w.Fd())), nil)
	var m vmmv1.Request
	if _, err := b.Read(&m); !errors.Is(err, ErrTooManyFDs) {
		t.Errorf("read: %v, want ErrTooManyFDs", err)
	}
}

func TestPeerCredAndAllow(t *testing.T) {
	a, _ := pair(t)
	c, err := PeerCred(a.Unix())
	if err != nil {
		t.Fatal(err)
	}
	if c.UID != uint32(os.Getuid()) || c.PID != int32(os.Getpid()) {
		t.Errorf("peer %+v, want this process", c)
	}
	for _, tc := range []struct {
		allow Allow
		cred  Cred
		ok    bool
	}{
		{Allow{}, Cred{UID: uint32(os.Getuid())}, true},
		{Allow{}, Cred{UID: uint32(os.Getuid()) + 1}, false},
		{Allow{UIDs: []uint32{107}}, Cred{UID: 107, GID: 1}, true},
		{Allow{GIDs: []uint32{36}}, Cred{UID: 5, GID: 36}, true},
		{Allow{UIDs: []uint32{107}, GIDs: []uint32{36}}, Cred{UID: 5, GID: 5}, false},
	} {
		if err := tc.allow.Check(tc.cred); (err == nil) != tc.ok || err != nil && !errors.Is(err, ErrPeerNotAllowed) {
			t.Errorf("%+v.Check(%+v) = %v, want ok %v", tc.allow, tc.cred, err, tc.ok)
		}
	}
}

// FuzzRead feeds a Conn arbitrary bytes: it never panics and never
// allocates for a length above MaxFrame; each frame it accepts
// re-encodes within MaxFrame.
func FuzzRead(f *testing.F) {
	body, _ := proto.Marshal(attach("nic0", []byte("cfg")))
	f.Add(append(binary.LittleEndian.AppendUint32(nil, uint32(len(body))), body...))
	f.Add([]byte{0xff, 0xff, 0xff, 0x7f})
	f.Add([]byte{1, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := pair(t)
		go func() {
			a.Unix().Write(in)
			a.Unix().CloseWrite()
		}()
		for {
			var m vmmv1.Request
			fds, err := b.Read(&m)
			closeAll(fds)
			if err != nil {
				return
			}
			if n := proto.Size(&m); n > MaxFrame {
				t.Fatalf("accepted a message of %d bytes", n)
			}
		}
	})
}
