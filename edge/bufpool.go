package edge

import "sync"

// proxyBufferSize is the copy buffer ReverseProxy would otherwise allocate
// afresh for every proxied response.
const proxyBufferSize = 32 << 10

// bufferPool lends copy buffers to the reverse proxies. Without it every
// call allocated and zeroed 32 KiB, which at thousands of calls a second
// was most of the edge's garbage.
type bufferPool struct{ p sync.Pool }

func newBufferPool() *bufferPool {
	return &bufferPool{p: sync.Pool{New: func() any { b := make([]byte, proxyBufferSize); return &b }}}
}

func (b *bufferPool) Get() []byte { return *b.p.Get().(*[]byte) }

func (b *bufferPool) Put(buf []byte) {
	if cap(buf) != proxyBufferSize {
		return
	}
	buf = buf[:proxyBufferSize]
	b.p.Put(&buf)
}
