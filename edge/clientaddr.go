package edge

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
)

// TrustedProxies are the proxies in front of a Tollgate server (a TLS load
// balancer, the dashboard) whose X-Forwarded-For it believes, so that the
// audit log's "from where" is the caller's address rather than the
// proxy's. Empty trusts none: a caller can write X-Forwarded-For itself.
type TrustedProxies []netip.Prefix

// ParseTrustedProxies reads a setting's IP addresses and CIDR ranges
// (10.0.0.0/8, 127.0.0.1, ::1); setting names it in the error.
func ParseTrustedProxies(setting string, list []string) (TrustedProxies, error) {
	var t TrustedProxies
	var errs []error
	for _, s := range list {
		if p, err := netip.ParsePrefix(strings.TrimSpace(s)); err == nil {
			if p.Addr().Is4In6() {
				p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
			}
			t = append(t, p.Masked())
			continue
		}
		if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil && a.Zone() == "" {
			a = a.Unmap()
			t = append(t, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		errs = append(errs, fmt.Errorf("%s: %q is neither an IP address nor a CIDR range (such as 10.0.0.0/8)", setting, s))
	}
	return t, errors.Join(errs...)
}

// Trusts reports whether peer (host or host:port) is one of the proxies.
func (t TrustedProxies) Trusts(peer string) bool {
	a, err := netip.ParseAddr(hostOnly(peer))
	return err == nil && t.trusts(a)
}

func (t TrustedProxies) trusts(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range t {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ClientAddr is the address a call came from: peer's host (peer is host or
// host:port), or, when peer is a trusted proxy, the nearest address in
// forwardedFor (X-Forwarded-For's values, in order) that is not one. Each
// proxy appends the address it was called from, so the entries are read
// from the right, past trusted ones; the ones left of the first untrusted
// address are the caller's to write, and are not believed. An entry that
// is not an address ends the walk at the last trusted one.
func (t TrustedProxies) ClientAddr(peer string, forwardedFor []string) string {
	host := hostOnly(peer)
	if len(t) == 0 {
		return host
	}
	a, err := netip.ParseAddr(host)
	if err != nil || !t.trusts(a) {
		return host
	}
	for i := len(forwardedFor) - 1; i >= 0; i-- {
		entries := strings.Split(forwardedFor[i], ",")
		for j := len(entries) - 1; j >= 0; j-- {
			e := strings.TrimSpace(entries[j])
			if e == "" {
				continue
			}
			next, ok := forwardedAddr(e)
			if !ok {
				return a.Unmap().String()
			}
			if !t.trusts(next) {
				return next.Unmap().String()
			}
			a = next
		}
	}
	return a.Unmap().String()
}

// forwardedAddr reads one X-Forwarded-For entry: an address, perhaps with
// a port, an IPv6 one perhaps in brackets.
func forwardedAddr(e string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(e); err == nil {
		return a.WithZone(""), true
	}
	if ap, err := netip.ParseAddrPort(e); err == nil {
		return ap.Addr().WithZone(""), true
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(e, "["), "]")); err == nil {
		return a.WithZone(""), true
	}
	return netip.Addr{}, false
}

// RequestClientAddr is ClientAddr for a net/http request.
func (t TrustedProxies) RequestClientAddr(r *http.Request) string {
	if len(t) == 0 {
		return hostOnly(r.RemoteAddr)
	}
	return t.ClientAddr(r.RemoteAddr, r.Header.Values("X-Forwarded-For"))
}

// Forwarded gives a call's X-Forwarded-For values, in order. A front hands
// one over in CallInfo rather than the values themselves: they are read
// only for a refused call's audit event.
type Forwarded interface {
	ForwardedFor() []string
}

// HeaderForwarded is a net/http request's header as a Forwarded.
type HeaderForwarded http.Header

// ForwardedFor returns the header's X-Forwarded-For values.
func (h HeaderForwarded) ForwardedFor() []string { return http.Header(h).Values("X-Forwarded-For") }
