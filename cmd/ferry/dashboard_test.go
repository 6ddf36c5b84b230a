package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/credentials"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/agentproc"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
)

// dashboardFile is the Grafana dashboard deploy/ ships.
const dashboardFile = "../../deploy/grafana/ferry-dashboard.json"

// targetLabels are added by Prometheus when it scrapes, not by the agent.
var targetLabels = []string{"instance", "job"}

// dashboardQueries are the PromQL expressions of the dashboard's panels
// and variables, each with the legend labels it uses.
func dashboardQueries(t *testing.T) []query {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr   string `json:"expr"`
				Legend string `json:"legendFormat"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var qs []query
	for _, p := range d.Panels {
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			qs = append(qs, query{where: "panel " + p.Title, expr: tg.Expr, legend: tg.Legend})
		}
	}
	for _, v := range d.Templating.List {
		if m := labelValues.FindStringSubmatch(v.Definition); m != nil {
			qs = append(qs, query{where: "variable " + v.Name, expr: m[1], by: []string{m[2]}})
		}
	}
	return qs
}

type query struct {
	where, expr, legend string
	by                  []string // labels a label_values() asks for
}

var (
	labelValues  = regexp.MustCompile(`^label_values\(([a-z_:][a-z0-9_:]*),\s*([a-z_]+)\)$`)
	selector     = regexp.MustCompile(`\b((?:ferry|grpc|go|process)_[a-z0-9_]*)\b(\{[^}]*\})?`)
	matcher      = regexp.MustCompile(`([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"`)
	byClause     = regexp.MustCompile(`\bby\s*\(([^)]*)\)`)
	legendLabels = regexp.MustCompile(`\{\{\s*([a-z_]+)\s*\}\}`)
)

// series are the series of a /metrics page, by name: each one's labels.
type series map[string][]map[string]string

func parseSeries(pages ...string) series {
	s := series{}
	for _, page := range pages {
		for line := range strings.Lines(page) {
			m := seriesLine.FindStringSubmatch(strings.TrimSpace(line))
			if m == nil {
				continue
			}
			labels := map[string]string{}
			for _, l := range labelPair.FindAllStringSubmatch(m[2], -1) {
				labels[l[1]] = l[2]
			}
			s[m[1]] = append(s[m[1]], labels)
		}
	}
	return s
}

// check reports what q names that the series lack: a metric, a label
// the query matches on, aggregates by, or shows in its legend.
func (s series) check(q query) []string {
	var missing []string
	var names []string
	for _, sel := range selector.FindAllStringSubmatch(q.expr, -1) {
		name := sel[1]
		names = append(names, name)
		if len(s[name]) == 0 {
			missing = append(missing, "metric "+name)
			continue
		}
		for _, m := range matcher.FindAllStringSubmatch(sel[2], -1) {
			label, op, value := m[1], m[2], m[3]
			if slices.Contains(targetLabels, label) {
				continue
			}
			found := slices.ContainsFunc(s[name], func(l map[string]string) bool {
				v, ok := l[label]
				return ok && (op != "=" || v == value)
			})
			if !found {
				missing = append(missing, fmt.Sprintf("%s{%s%s%q}", name, label, op, value))
			}
		}
	}
	if len(names) == 0 {
		missing = append(missing, "no Ferry metric at all")
	}
	by := slices.Clone(q.by)
	for _, b := range byClause.FindAllStringSubmatch(q.expr, -1) {
		for l := range strings.SplitSeq(b[1], ",") {
			by = append(by, strings.TrimSpace(l))
		}
	}
	for _, l := range by {
		if l == "" || slices.Contains(targetLabels, l) {
			continue
		}
		for _, name := range names {
			if !slices.ContainsFunc(s[name], func(ls map[string]string) bool { _, ok := ls[l]; return ok }) {
				missing = append(missing, fmt.Sprintf("label %s on %s (by)", l, name))
			}
		}
	}
	for _, m := range legendLabels.FindAllStringSubmatch(q.legend, -1) {
		l := m[1]
		if slices.Contains(targetLabels, l) || slices.Contains(by, l) {
			continue
		}
		if !slices.ContainsFunc(names, func(name string) bool {
			return slices.ContainsFunc(s[name], func(ls map[string]string) bool { _, ok := ls[l]; return ok })
		}) {
			missing = append(missing, "legend label "+l)
		}
	}
	return missing
}

// TestDashboardMetrics checks the Grafana dashboard against live agents:
// two `ferry agent` processes with mutual TLS run a rate-capped migration
// that verifies and one that fails verification, and every metric each
// query names, with the labels it matches on, aggregates by and shows,
// is on their /metrics pages, scraped while the first migration streams
// (the gauges of a running migration) and after both.
func TestDashboardMetrics(t *testing.T) {
	bin := buildFerry(t)
	ca := peerauthtest.NewCA(t, "ferry dashboard CA")
	start := func() *agentproc.Agent {
		f := ca.Issue(t, "127.0.0.1", "localhost", "spiffe://ferry.test/agent")
		return agentproc.Start(t, bin, "agent", "--allow-sim", "--log-format=json",
			"--tls-cert="+f.Cert, "--tls-key="+f.Key, "--tls-ca="+f.CA, "--allow-client=*", "--allow-peer=*",
			"--listen=127.0.0.1:0", "--health-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", "--data-listen=127.0.0.1:0")
	}
	src, dst := start(), start()
	cc, err := peerauth.ClientTLS(ca.Issue(t, "spiffe://ferry.test/control-plane"), "")
	if err != nil {
		t.Fatal(err)
	}
	creds := credentials.NewTLS(cc)

	var during []string
	p := plan{id: "dash-1", sourceAddr: src.Addr(), destAddr: dst.Addr(), transfer: dst.Addr(), channels: 2, chunkSize: 1 << 20, creds: creds,
		pairs: []*ferryv1.DevicePair{{SourceDevice: "sim:size=48MiB,seed=91,rate=32MB/s", DestDevice: "sim:size=48MiB,seed=91"}}}
	r, err := migrate(t.Context(), p, func(m *ferryv1.Migration) {
		if during == nil && m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY && m.GetBytes() > 0 {
			during = []string{scrape(t, src), scrape(t, dst)}
		}
	})
	if err != nil || !r.Verified {
		t.Fatalf("migration: %v %+v", err, r)
	}
	if during == nil {
		t.Fatal("the watch never reported STOPCOPY with bytes moved")
	}
	bad := plan{id: "dash-2", sourceAddr: src.Addr(), destAddr: dst.Addr(), transfer: dst.Addr(), channels: 2, chunkSize: 1 << 20, creds: creds,
		pairs: []*ferryv1.DevicePair{{SourceDevice: "sim:size=4MiB,seed=92", DestDevice: "sim:size=4MiB,seed=93"}}}
	if r, err := migrate(t.Context(), bad, nil); err != nil || r.Verified {
		t.Fatalf("the migration to a wrong seed: %v %+v", err, r)
	}
	s := parseSeries(append(during, scrape(t, src), scrape(t, dst))...)
	qs := dashboardQueries(t)
	if len(qs) < 20 {
		t.Fatalf("only %d queries in the dashboard", len(qs))
	}
	for _, q := range qs {
		if missing := s.check(q); len(missing) > 0 {
			t.Errorf("%s: %s\n  not on the agents' /metrics: %s", q.where, q.expr, strings.Join(missing, "; "))
		}
	}
}

// The checker itself finds what is missing, so the test above cannot pass
// by matching nothing.
func TestDashboardCheckFindsMissing(t *testing.T) {
	s := parseSeries(`ferry_a_total{role="source",outcome="succeeded"} 1` + "\n" + `ferry_b{device="d"} 2` + "\n")
	for _, c := range []struct {
		q    query
		want int
	}{
		{query{expr: `sum by (outcome) (ferry_a_total{role="source"})`, legend: "{{outcome}}"}, 0},
		{query{expr: `ferry_b{instance=~"$instance"}`, legend: "{{instance}} {{device}}"}, 0},
		{query{expr: `ferry_c`}, 1},
		{query{expr: `ferry_a_total{role="dest"}`}, 1},
		{query{expr: `sum by (reason) (ferry_a_total)`}, 1},
		{query{expr: `ferry_b`, legend: "{{phase}}"}, 1},
		{query{expr: `time()`}, 1},
	} {
		if got := s.check(c.q); len(got) != c.want {
			t.Errorf("%s: missing %v, want %d", c.q.expr, got, c.want)
		}
	}
}
