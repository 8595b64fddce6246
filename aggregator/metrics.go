package aggregator

import (
	"fmt"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// apiMetrics are the usage API's request metrics: how many answers of each
// status each route gave, and how long they took, so an operator sees
// errors and slow usage reads without reading the log.
type apiMetrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// routeLabel is the route the metrics name a request by: its pattern,
// or "other" for any path the API does not serve (a 404, a probe for
// /admin/v1/x), so that a caller cannot grow the metrics' label sets.
func routeLabel(pattern string) string {
	switch pattern {
	case "/v1/usage", "/v1/requests", "/v1/meters", "/admin/v1/meters", "/healthz", "/readyz":
		return pattern
	}
	return "other"
}

func newAPIMetrics(reg prometheus.Registerer) (*apiMetrics, error) {
	m := &apiMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tollgate_usage_api_requests_total",
			Help: "Usage API answers by route (the pattern; other for any path it does not serve), method and status code.",
		}, []string{"route", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tollgate_usage_api_request_duration_seconds",
			Help:    "Time from a usage API request's arrival to its answer, by route.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"route"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.duration} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register usage API metrics: %w", err)
			}
		}
	}
	return m, nil
}

// middleware counts every answer. An error a handler returns is answered
// here (echo's error handler writes it), so its status is the one counted.
func (m *apiMetrics) middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		start := time.Now()
		if err := next(c); err != nil {
			c.Error(err)
		}
		route := routeLabel(c.Path())
		method := c.Request().Method
		switch method {
		case "GET", "HEAD", "POST", "OPTIONS":
		default:
			method = "other"
		}
		m.requests.WithLabelValues(route, method, strconv.Itoa(c.Response().Status)).Inc()
		m.duration.WithLabelValues(route).Observe(time.Since(start).Seconds())
		return nil
	}
}
