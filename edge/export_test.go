package edge

import "net"

// SetUpstreamResolver has the net/http proxy look up the upstream's host
// with r.
func SetUpstreamResolver(c *Config, r *net.Resolver) { c.upstreamResolver = r }
