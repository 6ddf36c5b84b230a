package telemetry

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Certificate is one certificate of an agent's TLS identity in use, as
// the agent's credential reloader reports it.
type Certificate struct {
	// Kind is "cert" (the agent's own) or "ca" (one of its CA bundle).
	Kind, Subject, Serial string
	NotAfter              time.Time
}

// Certificates is what WatchCertificates reads at every scrape.
type Certificates struct {
	// InUse are the certificates in use now.
	InUse func() []Certificate
	// Reloads and Failures count the identities taken into use after a
	// change of the files, and the changed files refused.
	Reloads, Failures func() uint64
}

// WatchCertificates exports the expiry of every certificate in use
// (ferry_tls_certificate_expiry_timestamp_seconds, which follows a
// reload) and the reload counters.
func (m *Metrics) WatchCertificates(reg prometheus.Registerer, c Certificates) {
	if m == nil {
		return
	}
	reg.MustRegister(
		certCollector{c.InUse, prometheus.NewDesc("ferry_tls_certificate_expiry_timestamp_seconds",
			"When a certificate in use expires (Unix seconds): the agent's own (kind=\"cert\") and each of its CA bundle (kind=\"ca\"). time() subtracted from it is the time left.",
			[]string{"kind", "subject", "serial"}, nil)},
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "ferry_tls_reloads_total",
			Help: "TLS identities taken into use after --tls-cert, --tls-key or --tls-ca changed.",
		}, func() float64 { return float64(c.Reloads()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "ferry_tls_reload_failures_total",
			Help: "Changes of --tls-cert, --tls-key or --tls-ca refused (a file that does not parse, a key that does not match, an expired certificate): the previous identity stays in use.",
		}, func() float64 { return float64(c.Failures()) }),
	)
}

type certCollector struct {
	read func() []Certificate
	desc *prometheus.Desc
}

func (c certCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c certCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cert := range c.read() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(cert.NotAfter.Unix()), cert.Kind, cert.Subject, cert.Serial)
	}
}
