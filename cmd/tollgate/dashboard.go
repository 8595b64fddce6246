package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/schemas"
	"github.com/tollgate-dev/tollgate/web"
)

// DashboardConfig is the customer dashboard's configuration.
type DashboardConfig struct {
	// Listen is where the dashboard is served; empty (the default) turns
	// it off. `tollgate demo` serves it on 127.0.0.1:8090.
	Listen string `yaml:"listen"`
	// UsageAPI and InvoiceAPI are the base URLs the dashboard forwards to;
	// by default the aggregator's and the invoicer's listen addresses.
	UsageAPI   string `yaml:"usage_api"`
	InvoiceAPI string `yaml:"invoice_api"`
	// TrustedProxies are the addresses and CIDR ranges of the proxies in
	// front of the dashboard (a TLS load balancer) whose X-Forwarded-For
	// it believes: the caller it names is the one the dashboard passes
	// on; from any other caller, the address the connection came from.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// DashboardMain serves the dashboard's pages and forwards its API calls,
// unchanged and with the caller's own key, to the usage and invoice APIs,
// so the browser talks to one origin and the APIs do all authorisation.
type DashboardMain struct {
	log *slog.Logger
	ln  net.Listener
	srv *http.Server
}

// NewDashboardMain binds the listener. usageAPI and invoiceAPI are base URLs.
func NewDashboardMain(listen, usageAPI, invoiceAPI string, trusted edge.TrustedProxies, log *slog.Logger) (*DashboardMain, error) {
	log = log.With("component", "dashboard")
	files, err := web.Handler()
	if err != nil {
		return nil, fmt.Errorf("dashboard files: %w", err)
	}
	usage, err := forwardTo(usageAPI, trusted, log)
	if err != nil {
		return nil, err
	}
	billing, err := forwardTo(invoiceAPI, trusted, log)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/", files)
	// Probes, as every component serves them: /healthz (the process
	// serves), /readyz (the two APIs it forwards to are ready).
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", readyBehind(map[string]string{"usage API": usageAPI, "invoice API": invoiceAPI}))
	mux.Handle("/v1/usage", usage)
	mux.Handle("/v1/requests", usage)
	mux.Handle("/v1/meters", usage)
	mux.Handle("/v1/usage/current", billing)
	mux.Handle("/v1/invoices", billing)
	mux.Handle("/v1/invoices/", billing)
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("dashboard listen: %w", err)
	}
	return &DashboardMain{log: log, ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}, nil
}

func forwardTo(base string, trusted edge.TrustedProxies, log *slog.Logger) (http.Handler, error) {
	u, err := url.Parse(base)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("dashboard: bad API address %q", base)
	}
	return &httputil.ReverseProxy{
		// The caller's address goes on in X-Forwarded-For, for the audit
		// log of the usage and invoice APIs, which believe it when they
		// list the dashboard in their trusted_proxies: the address the
		// connection came from, or behind a balancer listed in
		// dashboard.trusted_proxies, the caller it forwarded for, resolved
		// here (the APIs trust the dashboard, not the balancer).
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.SetXForwarded()
			r.Out.Header.Set("X-Forwarded-For", trusted.RequestClientAddr(r.In))
		},
		// Usage, invoices and the request log are an account's: a
		// browser keeps none of it on disk, where it would outlive the
		// tab and "Forget key" on a shared computer.
		ModifyResponse: func(r *http.Response) error {
			r.Header.Set("Cache-Control", "no-store")
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			// The one error shape, with a request id of its own in the
			// body, the header and the log line, so a failure the caller
			// reports can be found.
			rid := edge.RequestIDFor(schemas.NewEventID())
			log.Warn("dashboard API call failed", "path", r.URL.Path, "request_id", rid, "err", err)
			ae := edge.NewAPIError(http.StatusBadGateway, edge.TypeAPI, "upstream_unavailable", "The usage or invoice API could not be reached.")
			ae.RequestID = rid
			body, _ := edge.ErrorJSON(ae)
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set(edge.HeaderRequestID, rid)
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write(body)
		},
	}, nil
}

// readyBehind answers /readyz for the dashboard: 200 when every API in
// apis (name: base URL) answers its own /readyz with 200 within a second,
// else 503 naming those that did not. They are asked at once, each probe
// bounded, so a silent API costs the probe one second, not more.
func readyBehind(apis map[string]string) http.HandlerFunc {
	client := &http.Client{Timeout: time.Second}
	return func(w http.ResponseWriter, r *http.Request) {
		type answer struct {
			name string
			err  error
		}
		answers := make(chan answer, len(apis))
		for name, base := range apis {
			go func() {
				req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, strings.TrimSuffix(base, "/")+"/readyz", nil)
				if err == nil {
					var resp *http.Response
					if resp, err = client.Do(req); err == nil {
						_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
						resp.Body.Close()
						if resp.StatusCode != http.StatusOK {
							err = fmt.Errorf("status %d", resp.StatusCode)
						}
					}
				}
				answers <- answer{name, err}
			}()
		}
		var down []string
		for range apis {
			if a := <-answers; a.err != nil {
				down = append(down, a.name)
			}
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if len(down) > 0 {
			slices.Sort(down)
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = io.WriteString(w, "not ready: "+strings.Join(down, ", ")+" not ready or not answering\n")
			return
		}
		_, _ = io.WriteString(w, "ok\n")
	}
}

// Addr is the dashboard's address.
func (m *DashboardMain) Addr() string { return m.ln.Addr().String() }

// Run serves until ctx ends.
func (m *DashboardMain) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- m.srv.Serve(m.ln) }()
	m.log.Info("dashboard listening", "url", "http://"+m.Addr())
	select {
	case err := <-errc:
		return fmt.Errorf("dashboard serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Close releases the listener.
func (m *DashboardMain) Close() error {
	err := m.srv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func httpBase(addr string) string {
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return addr
	}
	return "http://" + addr
}

// dashboardAfter starts the dashboard for components already started in
// this process, so it forwards to their real (possibly port-0) addresses.
func dashboardAfter(cfg Config, log *slog.Logger, started []named) ([]named, error) {
	if cfg.Dashboard.Listen == "" {
		return nil, nil
	}
	usageAPI, invoiceAPI := cfg.Dashboard.UsageAPI, cfg.Dashboard.InvoiceAPI
	for _, n := range started {
		switch m := n.c.(type) {
		case *AggregateMain:
			if usageAPI == "" {
				usageAPI = m.Addr()
			}
		case *InvoiceMain:
			if invoiceAPI == "" {
				invoiceAPI = m.Addr()
			}
		}
	}
	if usageAPI == "" {
		usageAPI = cfg.Aggregator.Listen
	}
	if invoiceAPI == "" {
		invoiceAPI = cfg.Invoicer.Listen
	}
	trusted, err := edge.ParseTrustedProxies("dashboard.trusted_proxies", cfg.Dashboard.TrustedProxies)
	if err != nil {
		return nil, err
	}
	m, err := NewDashboardMain(cfg.Dashboard.Listen, httpBase(usageAPI), httpBase(invoiceAPI), trusted, log)
	if err != nil {
		return nil, err
	}
	return []named{{"dashboard", m}}, nil
}

func dashboardComponent(_ context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	if cfg.Dashboard.Listen == "" {
		return nil, errors.New("dashboard.listen (or TOLLGATE_DASHBOARD_LISTEN) is not set")
	}
	return dashboardAfter(cfg, log, nil)
}
