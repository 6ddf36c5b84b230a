package soak

import (
	"fmt"
	"math/rand/v2"
	"strings"

	"github.com/vfio-ferry/ferry/pkg/size"
)

// lane is one pair of agent settings a migration runs under: the source
// and destination processes are started with them, so a migration picks
// its lane rather than setting them itself.
type lane struct {
	TLS    bool `json:"tls"`    // mutual TLS on every connection, else plaintext
	Direct bool `json:"direct"` // the destination serves direct data connections, else chunks travel in gRPC messages
}

func (l lane) String() string {
	s := "plain"
	if l.TLS {
		s = "tls"
	}
	if l.Direct {
		return s + "-direct"
	}
	return s + "-grpc"
}

// lanes are every lane, in a fixed order.
var lanes = [...]lane{{false, true}, {false, false}, {true, true}, {true, false}}

// slot is one simulated device of the soak's pool: the same identity
// (size, seed, flags) at the source and at the destination. A slot is
// used by one migration at a time, so its devices are migrated again and
// again, as a host's devices are; a fault that needs a device of its own
// (a hang, a read fault) adds keys to the slot's spec, which names
// another device with the same content.
type slot struct {
	index int
	base  string // "sim:size=...,seed=..."
	size  uint64
	pre   bool // the device supports PRE_COPY
}

// newSlots draws the pool of n devices.
func newSlots(rng *rand.Rand, n int, seedBase uint64) []slot {
	slots := make([]slot, n)
	for i := range slots {
		// 256 KiB to 24 MiB, page-aligned or not: the last chunk of a
		// device is rarely whole.
		sz := uint64(256<<10) + rng.Uint64N(24<<20)
		if rng.IntN(2) == 0 {
			sz &^= 4095
		}
		s := slot{index: i, size: sz}
		b := fmt.Sprintf("sim:size=%d,seed=%d", sz, seedBase+uint64(i))
		if rng.IntN(3) == 0 {
			b += fmt.Sprintf(",zero=0.%d", 1+rng.IntN(8))
		}
		if rng.IntN(2) == 0 {
			s.pre = true
			b += fmt.Sprintf(",flags=stopcopy|p2p|precopy,precopy=%d", sz/4+rng.Uint64N(sz/2))
			if rng.IntN(3) > 0 {
				b += fmt.Sprintf(",dirty=%dMB/s", 1+rng.IntN(4))
			}
		}
		s.base = b
		slots[i] = s
	}
	return slots
}

// devicePlan is one device pair of a migration.
type devicePlan struct {
	Slot int    `json:"slot"`
	Src  string `json:"source_device"`
	Dst  string `json:"dest_device"`
	Size uint64 `json:"size"`
}

// migrationPlan is one migration: its parameters and its faults, all
// drawn from the run's seed.
type migrationPlan struct {
	ID        string       `json:"id"`
	Round     int          `json:"round"`
	Lane      lane         `json:"lane"`
	Devices   []devicePlan `json:"devices"`
	Channels  uint32       `json:"channels"`
	ChunkSize uint32       `json:"chunk_size"`
	MaxBytes  uint64       `json:"max_bytes"` // the prepare's window per device
	MaxChunks uint32       `json:"max_chunks"`
	Precopy   bool         `json:"precopy"`
	SHA256    bool         `json:"sha256"`
	Faults    []fault      `json:"faults,omitempty"`
}

// totalBytes is the state of every device.
func (p *migrationPlan) totalBytes() uint64 {
	var n uint64
	for _, d := range p.Devices {
		n += d.Size
	}
	return n
}

// has reports whether the plan has a fault of class c.
func (p *migrationPlan) has(c faultClass) bool {
	for _, f := range p.Faults {
		if f.Class == c {
			return true
		}
	}
	return false
}

func (p *migrationPlan) String() string {
	var devs []string
	for _, d := range p.Devices {
		if d.Src == d.Dst {
			devs = append(devs, d.Src)
		} else {
			devs = append(devs, d.Src+" -> "+d.Dst)
		}
	}
	mode := "stop-copy"
	if p.Precopy {
		mode = "pre-copy"
	}
	var fs []string
	for _, f := range p.Faults {
		fs = append(fs, f.String())
	}
	faults := "no fault"
	if len(fs) > 0 {
		faults = strings.Join(fs, "; ")
	}
	return fmt.Sprintf("%s (round %d, %s, %s, %d channel(s), chunk %s, window %s/%d): %s; %s", p.ID, p.Round, p.Lane, mode,
		p.Channels, size.Format(uint64(p.ChunkSize)), size.Format(p.MaxBytes), p.MaxChunks, strings.Join(devs, ", "), faults)
}

// chunkSizes are the chunk sizes a migration draws from.
var chunkSizes = [...]uint32{64 << 10, 256 << 10, 1 << 20, 4 << 20}

// planner draws migrations from the run's seed.
type planner struct {
	rng   *rand.Rand
	cfg   *Config
	slots []slot
	next  int // migrations drawn so far
}

// draw plans one migration of round r on the free slots (taken out of
// free). It returns nil when too few slots are free.
func (pl *planner) draw(r int, free map[int]bool) *migrationPlan {
	rng := pl.rng
	n := 1 + rng.IntN(4)
	var avail []int
	for i := range pl.slots {
		if free[i] {
			avail = append(avail, i)
		}
	}
	if len(avail) == 0 {
		return nil
	}
	n = min(n, len(avail))
	p := &migrationPlan{
		ID:        fmt.Sprintf("soak-%d-%d", pl.cfg.Seed, pl.next),
		Round:     r,
		Lane:      lanes[rng.IntN(len(lanes))],
		Channels:  uint32(1 + rng.IntN(8)),
		ChunkSize: chunkSizes[rng.IntN(len(chunkSizes))],
		Precopy:   rng.IntN(3) == 0,
		SHA256:    rng.IntN(4) == 0,
	}
	pl.next++
	// The window: 1 to 4 chunks' worth beyond the chunk, or the agent's.
	p.MaxBytes = uint64(p.ChunkSize) * uint64(1+rng.IntN(4))
	p.MaxChunks = uint32(2 + rng.IntN(62))
	rng.Shuffle(len(avail), func(i, j int) { avail[i], avail[j] = avail[j], avail[i] })
	for _, i := range avail[:n] {
		s := pl.slots[i]
		delete(free, i)
		p.Devices = append(p.Devices, devicePlan{Slot: i, Src: s.base, Dst: s.base, Size: s.size})
	}
	if rng.Float64() < pl.cfg.FaultProbability {
		k := 1
		if rng.IntN(3) == 0 {
			k = 2
		}
		for range k {
			p.Faults = append(p.Faults, pl.drawFault(p))
		}
	}
	return p
}
