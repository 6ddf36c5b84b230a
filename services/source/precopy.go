package source

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Pre-copy (docs/design.md, step 3). A migration in MIGRATION_MODE_PRECOPY
// moves each device that has PRE_COPY from RUNNING to PRE_COPY once every
// channel is up, and its reader streams what the device offers while the
// VM runs, under the same window and sequence as the stop-copy chunks
// that follow on the same data stream, over every channel. A read that
// finds nothing new (ENOMSG, or 0) waits a little and looks again.
// Devices without PRE_COPY stay RUNNING and stream at the switchover.
//
// The reader asks its device for VFIO_MIG_GET_PRECOPY_INFO as it reads:
// after every chunk until the initial data is read whole (initial_bytes
// reached 0, or a read found nothing new), and every infoEvery after. Where
// the initial data ends in the stream is what the source tells the
// destination (Transfer.SwitchoverAck); a REINIT starts a new generation
// whose end is told once it is read. The supervisor (supervise) samples
// the migration every sampleEvery: it sends SwitchoverAck, which answers
// which devices have their initial data loaded and measures the round
// trip, moves the migration between PRECOPY and READY, asks each device
// for MIG_DATA_SIZE, and predicts the downtime (predict.go). It switches
// over when the control plane asks (Switchover: once READY; with force at
// once), when READY and the prediction meets downtime_limit, or at
// precopy_timeout as on_precopy_timeout says; otherwise, at the timeout,
// the migration fails with PRECOPY_NOT_CONVERGED and rolls back, the VM
// never stopped.
//
// The switchover: SwitchoverStart (retried until the destination has
// written every chunk sent before it; forced when the switchover is), then
// every device to STOP_COPY (through PRE_COPY_P2P / RUNNING_P2P when all
// have P2P), and the readers go on to the end of the state. A destination
// that refuses for initial data (a REINIT raced the switchover) sends the
// migration back to supervision. A rollback returns PRE_COPY devices to
// RUNNING.

const (
	// precopyPoll is how long a pre-copy reader waits after a read found
	// nothing new.
	precopyPoll = 10 * time.Millisecond
	// infoEvery is how often a reader asks for the pre-copy info once its
	// initial data is read.
	infoEvery = 50 * time.Millisecond
	// sampleEvery is the supervisor's period.
	sampleEvery = 100 * time.Millisecond
	// DefaultPrecopyTimeout bounds a pre-copy migration that sets no
	// precopy_timeout.
	DefaultPrecopyTimeout = 10 * time.Minute
)

// Switchover triggers (Migration.switchover_trigger).
const (
	triggerRequested     = "requested"
	triggerForced        = "forced"
	triggerDowntimeLimit = "downtime_limit"
	triggerTimeout       = "precopy_timeout"
)

// precopy is a pre-copy migration's switchover state.
type precopy struct {
	downtimeLimit time.Duration
	timeout       time.Duration
	onTimeout     ferryv1.PrecopyTimeoutAction

	// asked is closed by Switchover, forcedCh by a forced one; stopped
	// once every device is in STOP_COPY.
	asked, forcedCh, stopped       chan struct{}
	askOnce, forceOnce, stoppedOne sync.Once
	// idles counts the reads that found nothing new: a sample in which it
	// moved was not busy.
	idles atomic.Uint64

	// The supervisor's findings, for the API and the metrics; guarded by
	// mu.
	mu         sync.Mutex
	pred       prediction // the last; after the switchover, the last before it
	hasPred    bool       // pred was made at least once
	throughput float64
	dirtyRate  float64
	dirtyOK    bool
	ready      bool
	trigger    string
}

// precopyOf is the pre-copy state of a migration req asks for in
// pre-copy mode, nil otherwise.
func precopyOf(req *ferryv1.StartMigrationRequest) *precopy {
	if req.GetMode() != ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY {
		return nil
	}
	p := newPrecopy()
	p.downtimeLimit = req.GetDowntimeLimit().AsDuration()
	p.timeout = DefaultPrecopyTimeout
	if t := req.GetPrecopyTimeout().AsDuration(); t > 0 {
		p.timeout = t
	}
	p.onTimeout = req.GetOnPrecopyTimeout()
	return p
}

func newPrecopy() *precopy {
	return &precopy{asked: make(chan struct{}), forcedCh: make(chan struct{}), stopped: make(chan struct{})}
}

// ask starts the switchover, once READY or, forced, at once.
func (p *precopy) ask(force bool) {
	p.askOnce.Do(func() { close(p.asked) })
	if force {
		p.forceOnce.Do(func() { close(p.forcedCh) })
	}
}

func (p *precopy) forced() bool { return isDone(p.forcedCh) }

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// markStopped tells the readers the devices are in STOP_COPY.
func (p *precopy) markStopped() { p.stoppedOne.Do(func() { close(p.stopped) }) }

// idle waits after a pre-copy read found nothing: precopyPoll, or less
// when the devices stop.
func (p *precopy) idle(ctx context.Context) error {
	p.idles.Add(1)
	t := time.NewTimer(precopyPoll)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-p.stopped:
	case <-t.C:
	}
	return nil
}

// devPrecopy is one device's pre-copy bookkeeping. The reader writes it,
// the supervisor and the API read it, under mu; lastInfo is the reader's
// alone.
type devPrecopy struct {
	mu     sync.Mutex
	info   vfio.PrecopyInfo
	infoOK bool
	// generation counts the REINITs; complete says the initial data of
	// this generation is read whole, end where it ends in the stream.
	generation uint32
	complete   bool
	end        uint64
	// loaded: the destination has it loaded (SwitchoverAck).
	loaded bool
	// size is the device's last MIG_DATA_SIZE, when sizeOK.
	size   uint64
	sizeOK bool
	// stateChange is how long the device took to enter PRE_COPY (or, for
	// a device without it, 0: the supervisor has no measure).
	stateChange time.Duration
	// precopyBytes is what was read before the switchover, set at it.
	precopyBytes uint64
	stopped      bool

	lastInfo time.Time
}

// startPrecopy moves every device with PRE_COPY to PRE_COPY and keeps its
// data stream. A device without PRE_COPY has no initial data: it is
// complete at once.
func (m *migration) startPrecopy() error {
	for _, d := range m.devs {
		if d.dev.Flags()&vfio.FlagPreCopy == 0 {
			d.pc.mu.Lock()
			d.pc.complete = true
			d.pc.mu.Unlock()
			continue
		}
		began := time.Now()
		s, err := d.dev.SetState(vfio.StatePreCopy)
		took := time.Since(began)
		if err != nil {
			return deviceapi.Error(d.spec, "enter PRE_COPY", err)
		}
		if s == nil {
			return wire.Errorf(codes.Internal, wire.ReasonDeviceState, "device %s: PRE_COPY opened no data stream", d.spec)
		}
		d.stream = s
		d.precopyDev.Store(true)
		d.pc.mu.Lock()
		d.pc.stateChange = took
		d.pc.mu.Unlock()
		d.inPrecopy.Store(true)
		d.notePrecopy(false)
	}
	return nil
}

// notePrecopy asks d's stream for its pre-copy info after a read (noData:
// the read found nothing new) and keeps what it says; only d's reader
// calls it, between reads, so the stream offset it records as the end of
// the initial data is exact.
func (d *srcDevice) notePrecopy(noData bool) {
	if !d.inPrecopy.Load() {
		return
	}
	p := &d.pc
	now := time.Now()
	p.mu.Lock()
	complete := p.complete
	p.mu.Unlock()
	if complete && !noData && now.Sub(p.lastInfo) < infoEvery {
		return
	}
	p.lastInfo = now
	// A stream without VFIO_MIG_GET_PRECOPY_INFO has no info: only a read
	// that finds nothing new ends its initial data.
	var info vfio.PrecopyInfo
	pi, infoOK := d.stream.(vfio.PrecopyInfoer)
	if infoOK {
		var err error
		info, err = pi.PrecopyInfo()
		infoOK = err == nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.infoOK = infoOK
	if infoOK {
		p.info = info
	}
	if infoOK && info.Reinit {
		p.generation++
		p.complete = false
	}
	// The kernel says both counts are 0 exactly when a read finds nothing
	// new: either ends the initial data.
	if !p.complete && (noData || infoOK && info.InitialBytes == 0) {
		p.complete, p.end = true, d.read.Load()
	}
}

// initialData is what the source tells the destination of d.
func (d *srcDevice) initialData() *ferryv1.InitialData {
	d.pc.mu.Lock()
	defer d.pc.mu.Unlock()
	return &ferryv1.InitialData{Device: uint32(d.index), Generation: d.pc.generation, Complete: d.pc.complete, End: d.pc.end}
}

// sizeReport is what d says it has left, for the prediction.
func (d *srcDevice) sizeReport() sizeReport {
	d.pc.mu.Lock()
	defer d.pc.mu.Unlock()
	return sizeReport{
		spec: d.spec, precopy: d.precopyDev.Load(), infoOK: d.pc.infoOK,
		initial: d.pc.info.InitialBytes, dirty: d.pc.info.DirtyBytes,
		sizeOK: d.pc.sizeOK, size: d.pc.size, stateChangeTime: d.pc.stateChange,
	}
}

// backlog is what d's last info says it holds (initial + dirty), and
// whether it answered.
func (d *srcDevice) backlog() (uint64, bool) {
	d.pc.mu.Lock()
	defer d.pc.mu.Unlock()
	return satAdd(d.pc.info.InitialBytes, d.pc.info.DirtyBytes), d.pc.infoOK
}

// precopyStep is one decision of the supervisor.
type precopyStep int

const (
	stepWait precopyStep = iota
	stepSwitch
	stepFail
)

// decide is the supervisor's rule: switch over when asked and READY (at
// once when forced), when READY and the prediction meets the limit; at
// the timeout switch over forced or fail, as the request says.
func decide(p *precopy, ready, asked, forced, timedOut bool, pred prediction) (precopyStep, string) {
	switch {
	case forced:
		return stepSwitch, triggerForced
	case asked && ready:
		return stepSwitch, triggerRequested
	case ready && p.downtimeLimit > 0 && pred.ok && pred.downtime <= p.downtimeLimit:
		return stepSwitch, triggerDowntimeLimit
	case timedOut && p.onTimeout == ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER:
		return stepSwitch, triggerTimeout
	case timedOut:
		return stepFail, ""
	}
	return stepWait, ""
}

// supervise runs pre-copy until the switchover: it returns whether that
// is forced, or the error pre-copy ends with (the readers', the
// destination's, PRECOPY_NOT_CONVERGED). reading delivers the readers'
// result if they end first; readersEnded says it did.
func (m *migration) supervise(ctx context.Context, transfer ferryv1.TransferClient, session string, reading <-chan error, began time.Time) (forced, readersEnded bool, err error) {
	p := m.precopy
	tick := time.NewTicker(sampleEvery)
	defer tick.Stop()
	deadline := time.NewTimer(p.timeout - time.Since(began))
	defer deadline.Stop()
	var meter rateMeter
	var fixed fixedCosts
	var rtts rttTracker
	last := m.sampleCounters()
	timedOut := false
	// Each wakes the loop once: what they say is read from p after.
	asked, forcedCh := p.asked, p.forcedCh
	for {
		select {
		case <-ctx.Done():
			return false, false, ctx.Err()
		case err := <-reading:
			if err == nil {
				err = wire.Errorf(codes.Internal, wire.ReasonInternal, "pre-copy reading ended before the switchover")
			}
			return false, true, err
		case <-asked:
			asked = nil
		case <-forcedCh:
			forcedCh = nil
		case <-tick.C:
		case <-deadline.C:
			timedOut = true
		}
		// Sample: the bytes since the last tick, the busy throughput,
		// the dirty rate, the destination's acknowledgement.
		now := m.sampleCounters()
		meter.add(rateSampleOf(last, now))
		last = now
		ack, rtt, err := m.switchoverAck(ctx, transfer, session)
		switch {
		case err == nil:
			rtts.add(rtt)
			fixed.rtt, fixed.destStateChange = rtts.slowest(), ack.GetStateChangeTime().AsDuration()
		case !retryable(err):
			return false, false, peerError("switchover ack", err)
		}
		m.readSizes()
		// The throughput, no higher than the bandwidth limit in force:
		// one just lowered is not in the measurement yet.
		throughput := capThroughput(meter.throughput(), m.bandwidthCap())
		pred := predict(m.sizeReports(), throughput, fixed)
		ready := ack.GetReady()
		dirty, dirtyOK := meter.dirtyRate()
		p.mu.Lock()
		p.pred, p.hasPred, p.throughput, p.dirtyRate, p.dirtyOK = pred, true, throughput, dirty, dirtyOK
		if err == nil {
			p.ready = ready
		}
		ready = p.ready
		p.mu.Unlock()
		if err == nil {
			m.setPrecopyPhase(ready)
		}
		step, trigger := decide(p, ready, isDone(p.asked), p.forced(), timedOut, pred)
		switch step {
		case stepSwitch:
			p.mu.Lock()
			p.trigger = trigger
			p.mu.Unlock()
			m.log.Info("switchover", "trigger", trigger, "predicted_downtime", pred.downtime, "prediction", pred.ok, "remaining_bytes", pred.remaining, "note", pred.note)
			return trigger == triggerForced || trigger == triggerTimeout, false, nil
		case stepFail:
			return false, false, m.notConverged(pred, throughput, dirty, dirtyOK)
		}
	}
}

// notConverged is the error of a pre-copy that reached its timeout.
func (m *migration) notConverged(pred prediction, throughput, dirty float64, dirtyOK bool) error {
	p := m.precopy
	rate := "unknown"
	if dirtyOK {
		rate = fmt.Sprintf("%.1f MB/s", dirty/1e6)
	}
	what := "no switchover was asked"
	switch {
	case !p.ready:
		what = "the destination never loaded every device's initial data"
	case p.downtimeLimit > 0 && pred.ok:
		what = fmt.Sprintf("the predicted downtime %s stayed above the limit %s", pred.downtime.Round(time.Millisecond), p.downtimeLimit)
	case p.downtimeLimit > 0:
		what = "no downtime could be predicted (" + pred.note + ")"
	}
	m.a.cfg.Metrics.ConvergenceFailure()
	return wire.Errorf(codes.DeadlineExceeded, wire.ReasonNotConverged,
		"pre-copy did not converge within %s: %s; the devices dirty %s, Ferry sent %.1f MB/s, %d bytes were left; rolled back, the VM never stopped",
		p.timeout, what, rate, throughput/1e6, pred.remaining)
}

// setPrecopyPhase shows PRECOPY or READY, unless the switchover began.
func (m *migration) setPrecopyPhase(ready bool) {
	m.mu.Lock()
	ph := m.phase
	m.mu.Unlock()
	if ph != ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY && ph != ferryv1.MigrationPhase_MIGRATION_PHASE_READY {
		return
	}
	if ready {
		m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_READY)
	} else {
		m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY)
	}
}

// switchoverAck tells the destination where the initial data ends and
// learns what it has loaded, and how long the round trip took.
func (m *migration) switchoverAck(ctx context.Context, transfer ferryv1.TransferClient, session string) (*ferryv1.SwitchoverAckResponse, time.Duration, error) {
	req := &ferryv1.SwitchoverAckRequest{SessionId: session}
	for _, d := range m.devs {
		req.Devices = append(req.Devices, d.initialData())
	}
	ctx, cancel := context.WithTimeout(ctx, min(rpcTimeout, m.a.cfg.ProgressTimeout))
	defer cancel()
	sent := time.Now()
	resp, err := transfer.SwitchoverAck(ctx, req)
	rtt := time.Since(sent)
	if err != nil {
		return nil, 0, err
	}
	for i, d := range m.devs {
		d.pc.mu.Lock()
		d.pc.loaded = i < len(resp.GetLoaded()) && resp.GetLoaded()[i]
		d.pc.mu.Unlock()
	}
	return resp, rtt, nil
}

// readSizes asks every device for MIG_DATA_SIZE.
func (m *migration) readSizes() {
	for _, d := range m.devs {
		n, err := d.dev.DataSize()
		d.pc.mu.Lock()
		d.pc.size, d.pc.sizeOK = n, err == nil
		d.pc.mu.Unlock()
	}
}

func (m *migration) sizeReports() []sizeReport {
	out := make([]sizeReport, len(m.devs))
	for i, d := range m.devs {
		out[i] = d.sizeReport()
	}
	return out
}

// counters are what a sample compares: when, the bytes read, the idle
// reads, and the pre-copy devices' backlog (initial + dirty) and reinits.
type counters struct {
	at         time.Time
	read       uint64
	idles      uint64
	backlog    uint64
	backlogOK  bool
	generation uint64
}

func (m *migration) sampleCounters() counters {
	c := counters{at: time.Now(), idles: m.precopy.idles.Load(), backlogOK: true}
	for _, d := range m.devs {
		c.read += d.read.Load()
		if !d.precopyDev.Load() {
			continue
		}
		b, ok := d.backlog()
		c.backlog = satAdd(c.backlog, b)
		c.backlogOK = c.backlogOK && ok
		d.pc.mu.Lock()
		c.generation += uint64(d.pc.generation)
		d.pc.mu.Unlock()
	}
	return c
}

// rateSampleOf is the sample between two readings: the devices dirtied
// what was read in it plus what their backlog grew by (the initial data
// read shrinks the backlog as much as it adds to the bytes read).
func rateSampleOf(a, b counters) rateSample {
	s := rateSample{dt: b.at.Sub(a.at), bytes: b.read - a.read, busy: b.idles == a.idles}
	if a.backlogOK && b.backlogOK && a.generation == b.generation {
		produced := int64(s.bytes) + int64(b.backlog) - int64(a.backlog)
		s.dirtied, s.dirtyOK = uint64(max(produced, 0)), true
	}
	return s
}

// precopyRead is what d read while the VM ran: all it read so far until
// the switchover.
func (d *srcDevice) precopyRead() uint64 {
	if !d.precopyDev.Load() {
		return 0
	}
	d.pc.mu.Lock()
	defer d.pc.mu.Unlock()
	if d.pc.stopped {
		return d.pc.precopyBytes
	}
	return d.read.Load()
}

// markSwitchover keeps what each device read before the switchover.
func (m *migration) markSwitchover() {
	for _, d := range m.devs {
		d.pc.mu.Lock()
		d.pc.precopyBytes, d.pc.stopped = d.read.Load(), true
		d.pc.mu.Unlock()
	}
}

// precopySnapshot adds the pre-copy findings to s.
func (m *migration) precopySnapshot(s *ferryv1.Migration) {
	p := m.precopy
	if p == nil {
		return
	}
	s.DowntimeLimit = durationpb.New(p.downtimeLimit)
	s.PrecopyTimeout = durationpb.New(p.timeout)
	p.mu.Lock()
	hasPred := p.hasPred
	p.mu.Unlock()
	for i, d := range m.devs {
		if i >= len(s.Devices) {
			break
		}
		dp := s.Devices[i]
		dp.PrecopyBytes = d.precopyRead()
		d.pc.mu.Lock()
		dp.InitialDataLoaded = d.pc.loaded
		dp.InitialBytes, dp.DirtyBytes = d.pc.info.InitialBytes, d.pc.info.DirtyBytes
		dp.Reinits = d.pc.generation
		dp.NoSizeEstimate = hasPred && !d.pc.sizeOK
		d.pc.mu.Unlock()
		s.PrecopyBytes += dp.PrecopyBytes
		s.StopcopyBytes += dp.Bytes - dp.PrecopyBytes
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.hasPred {
		if p.pred.ok {
			s.PredictedDowntime = durationpb.New(p.pred.downtime)
		}
		s.PredictionNote = p.pred.note
		s.RemainingBytes = p.pred.remaining
		s.PrecopyThroughputBytesPerSecond = p.throughput
		if p.dirtyOK {
			s.DirtyBytesPerSecond = p.dirtyRate
		}
	}
	s.SwitchoverTrigger = p.trigger
}

// switchoverStart asks the destination to accept the switchover, within
// the reconnect timeout, again on transport errors and while it has not
// yet written every chunk sent before it (pre-copy chunks are in flight as
// it is asked).
func (m *migration) switchoverStart(ctx context.Context, transfer ferryv1.TransferClient, session string, force bool) error {
	again := func(err error) bool { return retryable(err) || wire.Reason(err) == wire.ReasonNotReady }
	return retryLoop(ctx, time.Now().Add(m.a.cfg.ReconnectTimeout), again, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
		defer cancel()
		_, err := transfer.SwitchoverStart(ctx, &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: m.sentChunks(), Force: force})
		return err
	})
}

// switchover asks a pre-copy migration to switch over.
func (m *migration) switchover(force bool) {
	if m.precopy != nil {
		m.precopy.ask(force)
	}
}
