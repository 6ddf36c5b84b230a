package deploy

import (
	"os"
	"path"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// csiVariables are the variables cert-manager's csi-driver expands in a
// volume's dns-names, uri-sans and common-name; any other fails the
// volume's mount.
var csiVariables = []string{"POD_NAME", "POD_NAMESPACE", "POD_UID", "SERVICE_ACCOUNT_NAME"}

// TestPerNodeCertificates checks the per-node-certs overlay: the agent's
// --tls-* files come from a csi.cert-manager.io volume, not a Secret,
// whose certificate serves and dials (both usages), carries the identity
// the allowlists admit, names the pod with variables the driver knows,
// and is written where the flags look.
func TestPerNodeCertificates(t *testing.T) {
	r := render(t, "per-node-certs")
	ds, c := r.agentDaemonSet(t)
	f := flags(t, c.Args)

	var vol *corev1.Volume
	var mount string
	for _, flag := range []string{"tls-cert", "tls-key", "tls-ca"} {
		p, ok := f[flag]
		if !ok {
			t.Fatalf("no --%s", flag)
		}
		for _, m := range c.VolumeMounts {
			if strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/") {
				for i := range ds.Spec.Template.Spec.Volumes {
					if v := &ds.Spec.Template.Spec.Volumes[i]; v.Name == m.Name {
						vol, mount = v, m.MountPath
					}
				}
			}
		}
		if vol == nil {
			t.Fatalf("--%s=%s is in no mounted volume", flag, p)
		}
	}
	if vol.Secret != nil || vol.CSI == nil || vol.CSI.Driver != "csi.cert-manager.io" {
		t.Fatalf("the TLS volume is not (only) a csi.cert-manager.io volume: %+v", vol.VolumeSource)
	}
	if vol.CSI.ReadOnly == nil || !*vol.CSI.ReadOnly {
		t.Error("the CSI volume is not read-only (the driver requires it)")
	}
	if fromSecret(ds, c, f["tls-cert"]) {
		t.Error("the certificate still comes from a Secret")
	}
	attr := vol.CSI.VolumeAttributes
	if attr["csi.cert-manager.io/issuer-name"] == "" {
		t.Error("no issuer-name")
	}
	usages := strings.Split(attr["csi.cert-manager.io/key-usages"], ",")
	for _, u := range []string{"server auth", "client auth", "digital signature"} {
		if !slices.Contains(usages, u) {
			t.Errorf("key-usages %v lack %q: the agent serves and dials with the certificate", usages, u)
		}
	}
	// The files where the flags look (the driver's defaults otherwise).
	for flag, key := range map[string]string{"tls-cert": "certificate-file", "tls-key": "privatekey-file", "tls-ca": "ca-file"} {
		name := attr["csi.cert-manager.io/"+key]
		if name == "" {
			name = map[string]string{"certificate-file": "tls.crt", "privatekey-file": "tls.key", "ca-file": "ca.crt"}[key]
		}
		if got := path.Join(mount, name); got != f[flag] {
			t.Errorf("--%s=%s, but the driver writes %s", flag, f[flag], got)
		}
	}
	// Only the driver's variables, so the mount does not fail.
	for _, key := range []string{"dns-names", "uri-sans", "common-name"} {
		os.Expand(attr["csi.cert-manager.io/"+key], func(v string) string {
			if !slices.Contains(csiVariables, v) {
				t.Errorf("%s uses ${%s}: the csi-driver expands only %v", key, v, csiVariables)
			}
			return "x"
		})
	}
	if !strings.Contains(attr["csi.cert-manager.io/dns-names"], "${POD_NAME}") {
		t.Error("the DNS name is not the pod's own: every agent would have the same")
	}
	if ip := attr["csi.cert-manager.io/ip-sans"]; strings.Contains(ip, "$") {
		t.Errorf("ip-sans %q: the csi-driver does not expand variables there", ip)
	}
	// The identity the production allowlists admit.
	var peers string
	for _, cm := range r.configMaps {
		if v, ok := cm.Data["allow-peers"]; ok {
			peers = v
		}
	}
	uris := strings.Split(attr["csi.cert-manager.io/uri-sans"], ",")
	for _, p := range strings.Split(peers, ",") {
		if !slices.Contains(uris, strings.TrimSpace(p)) {
			t.Errorf("the certificate's URI SANs %v lack %q of allow-peers: the agents would refuse each other", uris, p)
		}
	}
}
