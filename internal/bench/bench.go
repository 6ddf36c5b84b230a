// Package bench is `ferry bench`: it measures Ferry against the
// transport it is built on, the same bytes over the same number of plain TCP loopback connections, in
// the same run, interleaved (rawtcp, ferry, rawtcp, ferry, ...) so a
// neighbour's load hits both alike, and reports medians. With --tls both
// run under mutual TLS 1.3, as the agents do in production.
//
// Every side runs in a child process of its own (the ferry binary re-executed),
// so its CPU time (user+sys, from wait4's rusage) and its peak RSS
// (VmHWM) are its own and nothing of the orchestrator's:
//
//   - rawtcp: `ferry bench peer rawtcp-recv` and `ferry bench peer
//     rawtcp-send` (rawtcp.go). The sender reads simulated source
//     devices and writes each chunk behind a 4-byte length; the receiver
//     writes the chunks into simulated destination devices, which verify
//     every byte, exactly as a Ferry destination's devices do.
//   - ferry: the real agents, `ferry dest` and `ferry source`, with a
//     migration driven from here as a control plane would (the control
//     plane's own CPU is not counted).
//
// Throughput is device-state bytes over the time from the first device
// read at the source to the destination's devices verified, for both.
//
// With --link RATE both arms run across a shaped link instead of loopback
// (link.go): the figure is then Ferry against raw TCP at the link's rate.
// With --max-bandwidth RATE each round has a third arm, ferry with the
// migration limited to RATE, and the report says what fraction of the
// limit it reached.
//
// The command parses the flags into a Config and gives it the control
// plane (Config.Migrate); the hidden `ferry bench peer` command is RunPeer.
package bench

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vfio-ferry/ferry/internal/crc32c"
	"github.com/vfio-ferry/ferry/internal/shapedlink"
	"github.com/vfio-ferry/ferry/pkg/ephemeralca"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

// config is what one bench run moves.
type config struct {
	size      uint64 // per device
	devices   int
	chunkSize uint32
	window    uint64  // destination window per device, bytes
	rate      string  // sim read cap, "" for none
	zero      float64 // the sim's zero fraction: a share of 4 KiB pages all zero
	compress  bool    // ferry's migration compresses its chunks (zstd)
	exe       string  // this binary
	grpcData  bool    // chunks in gRPC messages, not on direct data connections
	tls       *certs
	migrate   MigrateFunc
	// link is the shaped link both sides run across; nil on loopback.
	link *shapedlink.Link
	// maxBandwidth is the limit of the --max-bandwidth arm (0: no arm).
	maxBandwidth uint64
}

// certs are the certificates of a `ferry bench --tls` run, from a CA
// made for the run: the agents' (also the raw TCP peers') and the control
// plane's. A nil *certs is a plaintext run; its methods say so.
type certs struct {
	agent, client peerauth.TLSFiles
}

// The identities in the bench's certificates.
const (
	agentID  = "spiffe://ferry.bench/agent"
	clientID = "spiffe://ferry.bench/control-plane"
)

// newCerts issues the run's certificates into dir.
func newCerts(dir string) (*certs, error) {
	ca, err := ephemeralca.New(dir, "ferry bench CA")
	if err != nil {
		return nil, err
	}
	agent, err := ca.Issue(ephemeralca.Options{}, "127.0.0.1", agentID)
	if err != nil {
		return nil, err
	}
	client, err := ca.Issue(ephemeralca.Options{Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, clientID)
	if err != nil {
		return nil, err
	}
	return &certs{agent: peerauth.TLSFiles(agent), client: peerauth.TLSFiles(client)}, nil
}

// agentArgs are an agent's security flags: mutual TLS with the run's
// certificates, or plaintext.
func (t *certs) agentArgs(servesTransfer bool) []string {
	if t == nil {
		return []string{"--insecure"}
	}
	args := []string{"--tls-cert", t.agent.Cert, "--tls-key", t.agent.Key, "--tls-ca", t.agent.CA, "--allow-client", clientID}
	if servesTransfer {
		args = append(args, "--allow-peer", agentID)
	}
	return args
}

// peerArgs are a raw TCP peer's: the agent's certificate, or nothing.
func (t *certs) peerArgs() []string {
	if t == nil {
		return nil
	}
	return []string{"--tls-cert", t.agent.Cert, "--tls-key", t.agent.Key, "--tls-ca", t.agent.CA}
}

// clientCreds are the control plane's credentials.
func (t *certs) clientCreds() (credentials.TransportCredentials, error) {
	if t == nil {
		return insecure.NewCredentials(), nil
	}
	c, err := peerauth.ClientTLS(t.client, "")
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(c), nil
}

// totalBytes is the state of every device.
func (c config) totalBytes() uint64 { return c.size * uint64(c.devices) }

// specs are the devices' specs, the same on both sides.
func (c config) specs() []string {
	specs := make([]string, c.devices)
	for i := range specs {
		specs[i] = fmt.Sprintf("sim:size=%d,seed=%d", c.size, i+1)
		if c.rate != "" {
			specs[i] += ",rate=" + c.rate
		}
		if c.zero > 0 {
			specs[i] += ",zero=" + strconv.FormatFloat(c.zero, 'f', -1, 64)
		}
	}
	return specs
}

// sample is one measured transfer.
type sample struct {
	bytesPerSecond float64
	seconds        float64
	cpuSeconds     float64 // user+sys of both sides
	sendCPU        float64
	recvCPU        float64
	recvRSS        uint64  // peak RSS of the receiving side (the destination)
	sendRSS        uint64  // peak RSS of the sending side (the source)
	others         float64 // cores the rest of the machine used meanwhile; -1 unknown
}

// limitedRow is the --max-bandwidth arm's figures for a channel count.
type limitedRow struct {
	// MaxBandwidth is the migration's limit, bytes per second.
	MaxBandwidth        uint64     `json:"max_bandwidth"`
	BytesPerSecond      float64    `json:"bytes_per_second"`
	BytesPerSecondRange [2]float64 `json:"bytes_per_second_range"`
	// OfLimit is the median rate over the limit.
	OfLimit float64 `json:"of_limit"`
}

// roundInfo is one round as --json reports it.
type roundInfo struct {
	RawTCPOthersCores  float64 `json:"rawtcp_others_cores"`
	FerryOthersCores   float64 `json:"ferry_others_cores"`
	LimitedOthersCores float64 `json:"limited_others_cores,omitempty"`
	Quiet              bool    `json:"quiet"`
}

func (r sample) cpuPerGiB(bytes uint64) float64 {
	return r.cpuSeconds / (float64(bytes) / (1 << 30))
}

// row is what `ferry bench` reports for one channel count.
type row struct {
	Channels                  int        `json:"channels"`
	Devices                   int        `json:"devices"`
	BytesPerDevice            uint64     `json:"bytes_per_device"`
	ChunkSize                 uint32     `json:"chunk_size"`
	WindowBytes               uint64     `json:"window_bytes"`
	Rounds                    int        `json:"rounds"`
	Data                      string     `json:"data"` // how ferry's chunks travelled: direct or grpc
	TLS                       bool       `json:"tls"`  // mutual TLS on every connection, raw TCP's too
	RawTCPBytesPerSecond      float64    `json:"rawtcp_bytes_per_second"`
	FerryBytesPerSecond       float64    `json:"ferry_bytes_per_second"`
	Ratio                     float64    `json:"ratio"`
	RawTCPSeconds             float64    `json:"rawtcp_seconds"`
	FerrySeconds              float64    `json:"ferry_seconds"`
	RawTCPCPUSecondsPerGiB    float64    `json:"rawtcp_cpu_seconds_per_gib"`
	FerryCPUSecondsPerGiB     float64    `json:"ferry_cpu_seconds_per_gib"`
	CPURatio                  float64    `json:"cpu_ratio"`
	FerrySourceCPUSecondsGiB  float64    `json:"ferry_source_cpu_seconds_per_gib"`
	FerryDestCPUSecondsGiB    float64    `json:"ferry_dest_cpu_seconds_per_gib"`
	RawTCPSendCPUSecondsGiB   float64    `json:"rawtcp_send_cpu_seconds_per_gib"`
	RawTCPRecvCPUSecondsGiB   float64    `json:"rawtcp_recv_cpu_seconds_per_gib"`
	DestPeakRSSBytes          uint64     `json:"dest_peak_rss_bytes"`
	SourcePeakRSSBytes        uint64     `json:"source_peak_rss_bytes"`
	RawTCPRecvPeakRSSBytes    uint64     `json:"rawtcp_recv_peak_rss_bytes"`
	RawTCPSendPeakRSSBytes    uint64     `json:"rawtcp_send_peak_rss_bytes"`
	RawTCPBytesPerSecondRange [2]float64 `json:"rawtcp_bytes_per_second_range"`
	FerryBytesPerSecondRange  [2]float64 `json:"ferry_bytes_per_second_range"`
	RatioRange                [2]float64 `json:"ratio_range"`
	// Rounds in which others used more than a tenth of a core are
	// dropped from the medians; with no quiet round, none is
	// (NoQuietRound) and the figures are a loaded machine's.
	RoundDetails  []roundInfo `json:"round_details"`
	DroppedRounds int         `json:"dropped_rounds"`
	NoQuietRound  bool        `json:"no_quiet_round"`
	LoadAvgBefore float64     `json:"loadavg_1m_before"`
	LoadAvgAfter  float64     `json:"loadavg_1m_after"`
	CPUs          int         `json:"cpus"`
	CPUModel      string      `json:"cpu_model"`
	CRC32CMethod  string      `json:"crc32c_method"`
	// LinkBytesPerSecond is the shaped link's rate, 0 on loopback.
	LinkBytesPerSecond uint64 `json:"link_bytes_per_second,omitempty"`
	// Limited is the --max-bandwidth arm, when run.
	Limited *limitedRow `json:"limited,omitempty"`
}

// Config is one `ferry bench` invocation: what each transfer moves and
// how many are measured.
type Config struct {
	Size      uint64 // state bytes per simulated device, 1B to 1TiB
	Devices   int    // simulated devices, migrated in parallel: 1 to wire.MaxDevices
	ChunkSize uint32 // chunk size, and the raw TCP write size
	Window    uint64 // destination window per device, in bytes (ferry dest --max-buffer-bytes)
	Rate      string // cap on each simulated device's reads ("256MB/s"), "" for none
	// Zero is the share of the devices' 4 KiB pages that are all zero
	// (the sim's zero=): ferry sends them as headers, raw TCP every byte.
	Zero float64
	// Compress: ferry's migration compresses its chunks (zstd).
	Compress bool
	Channels []int  // the channel counts to measure, in order
	Rounds   int    // rounds per channel count; each runs rawtcp then ferry
	Only     string // "rawtcp" or "ferry" to run one side only (no ratio), "" for both
	GRPCData bool   // ferry's chunks in gRPC messages, not on direct data connections
	TLS      bool   // mutual TLS 1.3 on every connection, raw TCP's too
	JSON     bool   // one JSON object per channel count instead of the table
	// Link, when not 0, runs both sides across a link shaped to this many
	// bytes per second (internal/shapedlink; needs root) instead of
	// loopback.
	Link uint64
	// MaxBandwidth, when not 0, adds an arm to every round: ferry with
	// the migration limited to this many bytes per second.
	MaxBandwidth uint64

	// Exe is the ferry binary: every side of a transfer runs as a child
	// process of its own (`ferry dest`, `ferry source`, `ferry bench peer`).
	Exe string
	// Migrate drives one migration between the two agents, as a control
	// plane would.
	Migrate MigrateFunc
}

// Migration is the migration the bench asks Migrate for.
type Migration struct {
	SourceAddr, DestAddr string // the agents' gRPC addresses; the source reaches the destination at DestAddr
	Channels             uint32
	ChunkSize            uint32
	Specs                []string // the devices' specs, the same on both sides
	Creds                credentials.TransportCredentials
	// MaxBandwidth is the migration's bandwidth limit (0: none).
	MaxBandwidth uint64
	// Compress asks for zstd chunks.
	Compress bool
	// DestDial and SourceDial, when set, dial the agents (they run in
	// network namespaces of their own); nil: the default dialer.
	DestDial, SourceDial DialFunc
}

// Outcome is what the bench needs of a migration's result.
type Outcome struct {
	Verified   bool
	Phase      string // the final phase
	Error      string // why it failed, "" when it did not
	DirectData bool   // the chunks travelled on direct data connections
	Bytes      uint64 // device-state bytes moved
	// TransferSeconds is the time from the first chunk read at the source
	// to the destination's verdict.
	TransferSeconds float64
}

// MigrateFunc drives one migration to its end.
type MigrateFunc func(context.Context, Migration) (Outcome, error)

// Validate checks the configuration's ranges and combinations.
func (c Config) Validate() error {
	if len(c.Channels) == 0 {
		return errors.New("--channels: give at least one channel count")
	}
	for _, n := range c.Channels {
		if n < 1 || n > wire.MaxChannels {
			return fmt.Errorf("--channels: %d is not a channel count of 1 to %d", n, wire.MaxChannels)
		}
	}
	switch {
	case c.Size == 0 || c.Size > 1<<40:
		return errors.New("--size must be 1B to 1TiB")
	case c.Devices <= 0 || c.Devices > wire.MaxDevices:
		return fmt.Errorf("--devices must be 1 to %d", wire.MaxDevices)
	case c.ChunkSize < wire.MinChunkSize || c.ChunkSize > wire.MaxChunkSize:
		return errors.New("--chunk-size must be 4KiB to 16MiB")
	case c.Rounds <= 0 || c.Rounds > 100:
		return errors.New("--rounds must be 1 to 100")
	case c.Window < uint64(c.ChunkSize):
		return errors.New("--window must hold at least one chunk")
	case c.Only != "" && c.Only != "rawtcp" && c.Only != "ferry":
		return errors.New("--only must be rawtcp or ferry")
	case c.Link != 0 && c.Link < minLinkRate:
		return fmt.Errorf("--link must be at least %s", size.FormatRate(minLinkRate))
	case c.MaxBandwidth != 0 && c.MaxBandwidth < source.MinBandwidth:
		return fmt.Errorf("--max-bandwidth must be at least %s", size.FormatRate(source.MinBandwidth))
	case c.MaxBandwidth != 0 && c.Only != "":
		return errors.New("--max-bandwidth runs with both arms (no --only)")
	case c.Exe == "" || c.Migrate == nil:
		return errors.New("bench: no binary or no control plane to run with")
	}
	if c.Zero < 0 || c.Zero > 1 {
		return fmt.Errorf("--zero must be 0 to 1")
	}
	if c.Rate != "" {
		if _, err := size.ParseRate(c.Rate); err != nil {
			return fmt.Errorf("--rate: %v", err)
		}
	}
	return nil
}

// minLinkRate is the slowest link the bench shapes: 1 MB/s.
const minLinkRate = 1_000_000

// Run measures every channel count of cfg and prints the results on
// stdout, the progress of each round on stderr.
func Run(ctx context.Context, c Config, stdout, stderr io.Writer) error {
	if err := c.Validate(); err != nil {
		return err
	}
	cfg := config{size: c.Size, devices: c.Devices, chunkSize: c.ChunkSize, window: c.Window, rate: c.Rate, zero: c.Zero, compress: c.Compress, exe: c.Exe, grpcData: c.GRPCData, migrate: c.Migrate, maxBandwidth: c.MaxBandwidth}
	if c.Link != 0 {
		l, err := shapedlink.New(ctx, c.Link)
		if err != nil {
			return fmt.Errorf("--link: %w", err)
		}
		defer l.Close()
		cfg.link = l
	}
	if c.TLS {
		dir, err := os.MkdirTemp("", "ferry-bench-tls-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		if cfg.tls, err = newCerts(dir); err != nil {
			return fmt.Errorf("bench certificates: %w", err)
		}
	}
	if !c.JSON {
		fmt.Fprintf(stdout, "ferry bench: %d device(s) x %s, chunk %s, window %s/device%s, ferry chunks on %s, %s; %d round(s) per channel count, rawtcp and ferry interleaved, medians [min-max]\n",
			cfg.devices, size.Format(cfg.size), size.Format(uint64(cfg.chunkSize)), size.Format(cfg.window), rateNote(cfg.rate), dataNote(cfg.grpcData), tlsNote(cfg.tls), c.Rounds)
		if cfg.link != nil {
			fmt.Fprintf(stdout, "link: two network namespaces joined by a veth pair shaped by tbf to %s (%s) each way; both arms cross it\n",
				size.FormatRate(float64(c.Link)), bitRate(c.Link))
		}
		if cfg.maxBandwidth != 0 {
			fmt.Fprintf(stdout, "limited arm: ferry with max_bandwidth %s (%s)\n", size.FormatRate(float64(cfg.maxBandwidth)), bitRate(cfg.maxBandwidth))
		}
		fmt.Fprintf(stdout, "host: %d CPUs (%s; CRC-32C by %s), GOMAXPROCS %d per process, loadavg %s\n",
			runtime.NumCPU(), cpuModel(), crc32c.Method(), runtime.GOMAXPROCS(0), loadAvgLine())
	}
	var rows []row
	for _, n := range c.Channels {
		r, err := measureChannels(ctx, cfg, n, c.Rounds, c.Only, stderr)
		if err != nil {
			return err
		}
		rows = append(rows, r)
		if c.JSON {
			if err := json.NewEncoder(stdout).Encode(r); err != nil {
				return err
			}
		}
	}
	if !c.JSON {
		printTable(stdout, rows)
		for _, r := range rows {
			if l := r.Limited; l != nil {
				fmt.Fprintf(stdout, "limited arm, %d channel(s): %s [%s-%s] at max_bandwidth %s: %.3f of the limit\n", r.Channels,
					size.FormatRate(l.BytesPerSecond), size.FormatRate(l.BytesPerSecondRange[0]), size.FormatRate(l.BytesPerSecondRange[1]),
					size.FormatRate(float64(l.MaxBandwidth)), l.OfLimit)
			}
		}
		fmt.Fprintln(stdout, quietSummary(rows))
		fmt.Fprintf(stdout, "loadavg at the end: %s\n", loadAvgLine())
	}
	return nil
}

// bitRate prints bytes per second as a bit rate, as links are rated.
func bitRate(bps uint64) string {
	return strconv.FormatFloat(float64(bps)*8/1e9, 'f', -1, 64) + " Gbit/s"
}

func tlsNote(t *certs) string {
	if t == nil {
		return "plaintext"
	}
	return "mutual TLS 1.3 on every connection (rawtcp too)"
}

func rateNote(rate string) string {
	if rate == "" {
		return ""
	}
	return ", reads capped at " + rate + " per device"
}

// measureChannels runs the interleaved rounds for one channel count.
func measureChannels(ctx context.Context, cfg config, channels, rounds int, only string, stderr io.Writer) (row, error) {
	row := row{
		Channels: channels, Devices: cfg.devices, BytesPerDevice: cfg.size, ChunkSize: cfg.chunkSize,
		WindowBytes: cfg.window, Rounds: rounds, CPUs: runtime.NumCPU(), CPUModel: cpuModel(), CRC32CMethod: crc32c.Method(), LoadAvgBefore: loadAvg1(),
		Data: "direct", TLS: cfg.tls != nil,
	}
	if cfg.grpcData {
		row.Data = "grpc"
	}
	if cfg.link != nil {
		row.LinkBytesPerSecond = cfg.link.Rate
	}
	var allLim []sample
	var allRaw, allFer []sample
	var allRatios []float64
	var quietRound []bool
	for r := range rounds {
		var raw, fer sample
		var err error
		if only != "ferry" {
			m := startOthers()
			if raw, err = runRawTCP(ctx, cfg, channels); err != nil {
				return row, fmt.Errorf("rawtcp, %d channel(s), round %d: %w", channels, r+1, err)
			}
			raw.others = m.cores(raw.cpuSeconds)
			allRaw = append(allRaw, raw)
		}
		if only != "rawtcp" {
			m := startOthers()
			if fer, err = runFerry(ctx, cfg, channels, 0); err != nil {
				return row, fmt.Errorf("ferry, %d channel(s), round %d: %w", channels, r+1, err)
			}
			fer.others = m.cores(fer.cpuSeconds)
			allFer = append(allFer, fer)
		}
		var lim sample
		if cfg.maxBandwidth != 0 {
			m := startOthers()
			if lim, err = runFerry(ctx, cfg, channels, cfg.maxBandwidth); err != nil {
				return row, fmt.Errorf("ferry at max_bandwidth %d, %d channel(s), round %d: %w", cfg.maxBandwidth, channels, r+1, err)
			}
			lim.others = m.cores(lim.cpuSeconds)
			allLim = append(allLim, lim)
		}
		if only == "" {
			// Each round's ratio pairs two runs seconds apart, so the
			// median ratio is steadier than the ratio of the medians.
			allRatios = append(allRatios, fer.bytesPerSecond/raw.bytesPerSecond)
		}
		q := quiet(raw.others, fer.others, only != "ferry", only != "rawtcp")
		if cfg.maxBandwidth != 0 {
			q = q && quiet(lim.others, 0, true, false)
		}
		quietRound = append(quietRound, q)
		row.RoundDetails = append(row.RoundDetails, roundInfo{RawTCPOthersCores: raw.others, FerryOthersCores: fer.others, LimitedOthersCores: lim.others, Quiet: q})
		mark := ""
		if !q {
			mark = ", LOADED: dropped from the medians"
		}
		limNote := ""
		if cfg.maxBandwidth != 0 {
			limNote = fmt.Sprintf(", limited %s (others %s cores)", fmtRun(lim, cfg), fmtCores(lim.others, true))
		}
		fmt.Fprintf(stderr, "bench: %d channel(s), round %d/%d: rawtcp %s, ferry %s (others used %s/%s cores%s)%s\n",
			channels, r+1, rounds, fmtRun(raw, cfg), fmtRun(fer, cfg), fmtCores(raw.others, only != "ferry"), fmtCores(fer.others, only != "rawtcp"), mark, limNote)
	}
	raws, ferries, ratios, limited := keepQuiet(allRaw, quietRound), keepQuiet(allFer, quietRound), keepQuiet(allRatios, quietRound), keepQuiet(allLim, quietRound)
	row.DroppedRounds = rounds - max(len(raws), len(ferries))
	if row.DroppedRounds == rounds {
		row.NoQuietRound, row.DroppedRounds = true, 0
		raws, ferries, ratios, limited = allRaw, allFer, allRatios, allLim
	}
	if len(limited) > 0 {
		l := &limitedRow{MaxBandwidth: cfg.maxBandwidth}
		l.BytesPerSecond, l.BytesPerSecondRange = medianRange(limited, func(r sample) float64 { return r.bytesPerSecond })
		l.OfLimit = l.BytesPerSecond / float64(cfg.maxBandwidth)
		row.Limited = l
	}
	total := cfg.totalBytes()
	gib := float64(total) / (1 << 30)
	if len(raws) > 0 {
		row.RawTCPBytesPerSecond, row.RawTCPBytesPerSecondRange = medianRange(raws, func(r sample) float64 { return r.bytesPerSecond })
		row.RawTCPSeconds, _ = medianRange(raws, func(r sample) float64 { return r.seconds })
		row.RawTCPCPUSecondsPerGiB, _ = medianRange(raws, func(r sample) float64 { return r.cpuSeconds / gib })
		row.RawTCPSendCPUSecondsGiB, _ = medianRange(raws, func(r sample) float64 { return r.sendCPU / gib })
		row.RawTCPRecvCPUSecondsGiB, _ = medianRange(raws, func(r sample) float64 { return r.recvCPU / gib })
		for _, r := range raws {
			row.RawTCPRecvPeakRSSBytes = max(row.RawTCPRecvPeakRSSBytes, r.recvRSS)
			row.RawTCPSendPeakRSSBytes = max(row.RawTCPSendPeakRSSBytes, r.sendRSS)
		}
	}
	if len(ferries) > 0 {
		row.FerryBytesPerSecond, row.FerryBytesPerSecondRange = medianRange(ferries, func(r sample) float64 { return r.bytesPerSecond })
		row.FerrySeconds, _ = medianRange(ferries, func(r sample) float64 { return r.seconds })
		row.FerryCPUSecondsPerGiB, _ = medianRange(ferries, func(r sample) float64 { return r.cpuSeconds / gib })
		row.FerrySourceCPUSecondsGiB, _ = medianRange(ferries, func(r sample) float64 { return r.sendCPU / gib })
		row.FerryDestCPUSecondsGiB, _ = medianRange(ferries, func(r sample) float64 { return r.recvCPU / gib })
		// Peak RSS is reported as the largest of the rounds: it is a bound.
		for _, r := range ferries {
			row.DestPeakRSSBytes = max(row.DestPeakRSSBytes, r.recvRSS)
			row.SourcePeakRSSBytes = max(row.SourcePeakRSSBytes, r.sendRSS)
		}
	}
	if len(ratios) > 0 {
		row.Ratio, row.RatioRange = medianOf(ratios)
		if row.RawTCPCPUSecondsPerGiB > 0 {
			row.CPURatio = row.FerryCPUSecondsPerGiB / row.RawTCPCPUSecondsPerGiB
		}
	}
	row.LoadAvgAfter = loadAvg1()
	return row, nil
}

// keepQuiet keeps the values of the quiet rounds. v has one value per
// round, or none (an arm not run).
func keepQuiet[T any](v []T, quiet []bool) []T {
	var out []T
	for i, x := range v {
		if quiet[i] {
			out = append(out, x)
		}
	}
	return out
}

func fmtCores(c float64, ran bool) string {
	switch {
	case !ran:
		return "-"
	case c < 0:
		return "?"
	}
	return fmt.Sprintf("%.2f", c)
}

func fmtRun(r sample, cfg config) string {
	if r.bytesPerSecond == 0 {
		return "-"
	}
	return fmt.Sprintf("%s %.2f CPU-s/GiB", size.FormatRate(r.bytesPerSecond), r.cpuPerGiB(cfg.totalBytes()))
}

func medianRange(runs []sample, f func(sample) float64) (float64, [2]float64) {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	return medianOf(v)
}

// medianOf returns the median of v (the mean of the middle two for an even
// count) and its [min, max].
func medianOf(v []float64) (float64, [2]float64) {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	m := s[n/2]
	if n%2 == 0 {
		m = (s[n/2-1] + s[n/2]) / 2
	}
	return m, [2]float64{s[0], s[n-1]}
}

func printTable(w io.Writer, rows []row) {
	fmt.Fprintln(w)
	fmt.Fprintf(w, "%-8s  %-20s  %-20s  %-17s  %-16s  %-20s  %-9s  %-9s  %s\n",
		"channels", "rawtcp GB/s", "ferry GB/s", "ratio", "rawtcp CPU-s/GiB", "ferry CPU-s/GiB", "dest RSS", "src RSS", "seconds rawtcp/ferry")
	for _, r := range rows {
		gbs := func(v float64, rg [2]float64) string {
			if v == 0 {
				return "-"
			}
			return fmt.Sprintf("%.2f [%.2f-%.2f]", v/1e9, rg[0]/1e9, rg[1]/1e9)
		}
		ratio := "-"
		if r.Ratio > 0 {
			ratio = fmt.Sprintf("%.2f [%.2f-%.2f]", r.Ratio, r.RatioRange[0], r.RatioRange[1])
		}
		rawCPU, ferCPU := "-", "-"
		if r.RawTCPCPUSecondsPerGiB > 0 {
			rawCPU = fmt.Sprintf("%.2f", r.RawTCPCPUSecondsPerGiB)
		}
		if r.FerryCPUSecondsPerGiB > 0 {
			ferCPU = fmt.Sprintf("%.2f", r.FerryCPUSecondsPerGiB)
			if r.CPURatio > 0 {
				ferCPU += fmt.Sprintf(" (%.2fx)", r.CPURatio)
			}
		}
		secs := func(v float64) string {
			if v == 0 {
				return "-"
			}
			return fmt.Sprintf("%.2f", v)
		}
		fmt.Fprintf(w, "%-8d  %-20s  %-20s  %-17s  %-16s  %-20s  %-9s  %-9s  %s/%s\n",
			r.Channels, gbs(r.RawTCPBytesPerSecond, r.RawTCPBytesPerSecondRange), gbs(r.FerryBytesPerSecond, r.FerryBytesPerSecondRange),
			ratio, rawCPU, ferCPU, rssString(r.DestPeakRSSBytes), rssString(r.SourcePeakRSSBytes), secs(r.RawTCPSeconds), secs(r.FerrySeconds))
	}
}

func rssString(n uint64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
}

// loadAvgLine is /proc/loadavg's three load averages, or "unknown".
func loadAvgLine() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func loadAvg1() float64 {
	f := strings.Fields(loadAvgLine())
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// transferTimeout bounds one transfer: generous, a stuck run must still end.
func transferTimeout(cfg config) time.Duration {
	// 20 MB/s is far below anything this should run at.
	return time.Minute + time.Duration(float64(cfg.totalBytes())/20e6*float64(time.Second))
}

func dataNote(grpcData bool) string {
	if grpcData {
		return "gRPC messages"
	}
	return "direct data connections"
}
