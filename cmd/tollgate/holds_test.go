package main

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/invoicer"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	"github.com/tollgate-dev/tollgate/schemas"
)

// An edge whose Kafka is down holds usage from its first spooled event on,
// in Postgres, where the invoicer reads it; once the spool has drained the
// hold is released as of the drain, and the invoicer retires it when the
// usage watermark passes that.
func TestEdgeSpoolHoldsUsageUntilItsEventsAreInKafka(t *testing.T) {
	ctx := context.Background()
	broker := testenv.PrivateKafka(t)
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	topic := "holds." + testenv.Name(t)
	client := &kafka.Client{Addr: kafka.TCP(broker.Addr), Timeout: 20 * time.Second}
	_, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 4, ReplicationFactor: 1}}})
	testenv.Must(t, err, "create topic")
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	t.Cleanup(up.Close)
	cfg := testConfig(t, pg, ch, topic)
	cfg.Services.KafkaBrokers = []string{broker.Addr}
	cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), up.URL
	m, err := NewEdgeMain(ctx, cfg, quietLog())
	testenv.Must(t, err, "start the edge")
	stop := runComponent(t, m)
	closed := false
	shut := func() {
		if !closed {
			closed = true
			stop()
			testenv.Must(t, m.Close(), "close the edge")
		}
	}
	t.Cleanup(shut)
	p := &pipeline{pg: pg, edgeURL: "http://" + m.Addr()}
	key, _ := p.newKey(t, "acct_spool", schemas.Live)
	call := func() {
		t.Helper()
		if st := p.call(t, key, "/v1/widgets/1"); st != 200 {
			t.Fatalf("call: status %d", st)
		}
	}
	holds := invpg.New(pg.Pool)
	held := func() []schemas.SpoolHold {
		t.Helper()
		hs, err := holds.SpoolHolds(ctx)
		testenv.Must(t, err, "read holds")
		return hs
	}

	call() // Kafka up: straight through, no hold
	time.Sleep(time.Second)
	if hs := held(); len(hs) != 0 {
		t.Fatalf("holds with Kafka up: %+v, want none", hs)
	}
	broker.Stop()
	first := time.Now()
	for range 20 {
		call()
	}
	testenv.Wait(t, 60*time.Second, "the 20 calls' events spooled", func() bool { return m.SpoolDepth() == 20 })
	var hold schemas.SpoolHold
	testenv.Wait(t, 10*time.Second, "the spool's hold stored", func() bool {
		hs := held()
		if len(hs) == 1 {
			hold = hs[0]
		}
		return len(hs) == 1
	})
	if hold.Since.Before(first.Add(-time.Second)) || hold.Since.After(time.Now()) || !hold.Released.IsZero() {
		t.Fatalf("hold %+v: want it active, since the first spooled call (%s)", hold, first)
	}
	broker.Start()
	testenv.Wait(t, 90*time.Second, "the spool drained to Kafka", func() bool { return m.SpoolDepth() == 0 })
	testenv.Wait(t, 10*time.Second, "the hold released", func() bool {
		hs := held()
		if len(hs) == 1 {
			hold = hs[0]
		}
		return len(hs) == 1 && !hs[0].Released.IsZero()
	})
	if hold.Released.Before(hold.Since) || hold.Released.After(time.Now()) {
		t.Fatalf("released hold %+v: want a release after its since and before now", hold)
	}
	// A graceful stop keeps the released hold; the invoicer retires it
	// once the usage watermark passes the release.
	shut()
	if hs := held(); len(hs) != 1 || !hs[0].Released.Equal(hold.Released) {
		t.Fatalf("holds after the edge stopped: %+v, want the released one", hs)
	}
	hw := invoicer.HeldWatermark{Usage: fixedWatermark(hold.Released.Add(-time.Second)), Holds: holds, Log: quietLog()}
	if wm, err := hw.Watermark(ctx); err != nil || !wm.Equal(hold.Since) {
		t.Errorf("watermark before the release landed: %s, %v; want the hold's since %s", wm, err, hold.Since)
	}
	hw.Usage = fixedWatermark(hold.Released.Add(time.Second))
	if wm, err := hw.Watermark(ctx); err != nil || !wm.Equal(hold.Released.Add(time.Second)) {
		t.Errorf("watermark after the release landed: %s, %v; want the usage watermark", wm, err)
	}
	if hs := held(); len(hs) != 0 {
		t.Errorf("holds after the watermark passed the release: %+v, want it retired", hs)
	}
}

// fixedWatermark is a usage watermark standing still at a time.
type fixedWatermark time.Time

func (f fixedWatermark) Watermark(context.Context) (time.Time, error) { return time.Time(f), nil }

// An edge whose Redis does not answer (a wrong services.redis_addr) says so
// at start and on its first fallback, at Warn: it runs on, deciding limits
// per instance, and said so only at Debug before.
func TestAnEdgeWithoutRedisSaysSo(t *testing.T) {
	ctx := context.Background()
	pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
	topic := testenv.NewTopic(t, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	t.Cleanup(up.Close)
	cfg := testConfig(t, pg, ch, topic)
	cfg.Services.RedisAddr, cfg.Edge.Upstream = "127.0.0.1:1", up.URL
	var logs testenv.LogBuffer
	m, err := NewEdgeMain(ctx, cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	testenv.Must(t, err, "start the edge")
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done; _ = m.Close() })
	if !strings.Contains(logs.String(), "redis is not answering") || !strings.Contains(logs.String(), "127.0.0.1:1") {
		t.Fatalf("the edge started without a word about redis:\n%s", logs.String())
	}
	p := &pipeline{pg: pg, edgeURL: "http://" + m.Addr()}
	key, _ := p.newKey(t, "acct_no_redis", schemas.Live)
	for range 3 {
		if st := p.call(t, key, "/v1/x"); st != 200 {
			t.Fatalf("call with redis away: %d, want 200 from the local fallback", st)
		}
	}
	if n := strings.Count(logs.String(), "redis limiter failed"); n != 1 {
		t.Fatalf("%d fallback warnings for 3 calls, want 1 (at most one a minute):\n%s", n, logs.String())
	}
}
