package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/tollgate-dev/tollgate/edge"
	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/ingest"
	chsink "github.com/tollgate-dev/tollgate/ingest/clickhouse"
	"github.com/tollgate-dev/tollgate/invoicer"
	"github.com/tollgate-dev/tollgate/invoicer/api"
	invch "github.com/tollgate-dev/tollgate/invoicer/clickhouse"
	invkafka "github.com/tollgate-dev/tollgate/invoicer/kafka"
	invpg "github.com/tollgate-dev/tollgate/invoicer/postgres"
	invstripe "github.com/tollgate-dev/tollgate/invoicer/stripe"
	"github.com/tollgate-dev/tollgate/schemas"
)

// InvoiceMain runs the invoicer: the period-close loop (close, finalize,
// sync to Stripe) and the invoice API on its own listener.
type InvoiceMain struct {
	log      *slog.Logger
	pool     *pgxpool.Pool
	ch       driver.Conn
	iv       *invoicer.Invoicer
	srv      *http.Server
	ln       net.Listener
	interval time.Duration
	// auditor records the invoice API's failed authentications.
	auditor *edgepg.AuditWriter
	// metrics serves the registry on invoicer.metrics_listen (nil: off).
	metrics *http.Server
	mln     net.Listener
}

// newInvoicer wires the invoicer's dependencies.
func newInvoicer(ctx context.Context, cfg Config, reg prometheus.Registerer, log *slog.Logger) (*invoicer.Invoicer, *pgxpool.Pool, driver.Conn, error) {
	pool, err := openPostgres(ctx, cfg.Services.PostgresURL)
	if err != nil {
		return nil, nil, nil, err
	}
	ch, err := openClickHouse(ctx, cfg.Services, cfg.Services.ClickHouseDatabase)
	if err != nil {
		pool.Close()
		return nil, nil, nil, err
	}
	var sc invoicer.Stripe
	if s := cfg.Invoicer.Stripe; s.APIKey != "" {
		sc = invstripe.New(invstripe.Config{APIKey: s.APIKey, URL: s.APIURL})
	} else {
		log.Warn("invoicer.stripe.api_key is not set: invoices stay in the ledger and are not sent to Stripe")
	}
	usage := invch.New(ch)
	store := invpg.New(pool)
	// Periods wait for events the edges still hold in their spools.
	wm := invoicer.HeldWatermark{Usage: usage, Holds: store, Log: log}
	iv, err := invoicer.New(store, usage, wm, sc, invoicer.Options{Meters: cfg.Meters,
		Grace: cfg.Invoicer.Grace, Lookback: cfg.Invoicer.LookbackMonths, StripeMode: invoicer.StripeKeyMode(cfg.Invoicer.Stripe.APIKey),
		Registerer: reg}, log)
	if err != nil {
		pool.Close()
		ch.Close()
		return nil, nil, nil, err
	}
	return iv, pool, ch, nil
}

// NewInvoiceMain connects to Postgres and ClickHouse and binds the API.
func NewInvoiceMain(ctx context.Context, cfg Config, log *slog.Logger) (*InvoiceMain, error) {
	log = log.With("component", "invoice")
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	iv, pool, ch, err := newInvoicer(ctx, cfg, reg, log)
	if err != nil {
		return nil, err
	}
	var verifier invoicer.WebhookVerifier
	if cfg.Invoicer.Stripe.WebhookSecret != "" {
		verifier = &invstripe.Verifier{Secret: cfg.Invoicer.Stripe.WebhookSecret}
	}
	h := api.New(edgepg.NewKeyStore(pool), invpg.New(pool), invch.New(ch), iv, verifier, cfg.Meters, log)
	auditor, err := edgepg.NewAuditWriter(pool, time.Second, reg, log)
	if err != nil {
		pool.Close()
		ch.Close()
		return nil, err
	}
	h.SetAuditor(auditor)
	ready := readiness(postgresDep(pool), clickhouseDep(ch))
	h.SetReady(ready)
	trusted, err := edge.ParseTrustedProxies("invoicer.trusted_proxies", cfg.Invoicer.TrustedProxies)
	if err != nil {
		_ = auditor.Close()
		pool.Close()
		ch.Close()
		return nil, err
	}
	h.SetTrustedProxies(trusted)
	ln, err := net.Listen("tcp", cfg.Invoicer.Listen)
	if err != nil {
		_ = auditor.Close()
		pool.Close()
		ch.Close()
		return nil, fmt.Errorf("invoice api: listen on %s: %w", cfg.Invoicer.Listen, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 60 * time.Second}
	m := &InvoiceMain{log: log, pool: pool, ch: ch, iv: iv, srv: srv, ln: ln, interval: cfg.Invoicer.Interval, auditor: auditor}
	if cfg.Invoicer.MetricsListen != "" {
		if m.mln, m.metrics, err = metricsServer(cfg.Invoicer.MetricsListen, reg, ready, log); err != nil {
			_ = ln.Close()
			_ = m.Close()
			return nil, fmt.Errorf("invoicer metrics listener: %w", err)
		}
	}
	return m, nil
}

// Addr is the API's bound address.
func (m *InvoiceMain) Addr() string { return m.ln.Addr().String() }

// MetricsAddr is the /metrics listener's address ("" without one).
func (m *InvoiceMain) MetricsAddr() string {
	if m.mln == nil {
		return ""
	}
	return m.mln.Addr().String()
}

// Run serves the API and closes periods every interval until ctx ends.
func (m *InvoiceMain) Run(ctx context.Context) error {
	m.log.Info("invoicer running", "api", m.Addr())
	if m.metrics != nil {
		m.log.Info("metrics listening", "addr", m.MetricsAddr())
		go func() {
			if err := m.metrics.Serve(m.mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				m.log.Error("invoicer metrics server", "err", err)
			}
		}()
	}
	errc := make(chan error, 1)
	go func() {
		if err := m.srv.Serve(m.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
		close(errc)
	}()
	loopErr := m.iv.Run(ctx, m.interval)
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var merr error
	if m.metrics != nil {
		merr = m.metrics.Shutdown(sctx)
	}
	return errors.Join(loopErr, m.srv.Shutdown(sctx), <-errc, merr)
}

// Close writes the last audit rows and releases the connections.
func (m *InvoiceMain) Close() error {
	var errs []error
	if m.metrics != nil {
		errs = append(errs, m.metrics.Close())
	}
	if m.mln != nil {
		_ = m.mln.Close() // the server closed it if it ever served
	}
	errs = append(errs, m.auditor.Close())
	m.pool.Close()
	return errors.Join(append(errs, m.ch.Close())...)
}

func invoiceComponent(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	m, err := NewInvoiceMain(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return []named{{"invoice", m}}, nil
}

// invoiceCommand is `tollgate invoice` (the component) and the finance
// sub-commands.
func invoiceCommand(g *globalFlags) *cobra.Command {
	c := componentCommand(g, "invoice", "Close billing periods, sync invoices to Stripe, serve the invoice API", invoiceComponent)
	c.AddCommand(invoiceCloseCommand(g), invoiceReplayCommand(g), invoiceCreditNoteCommand(g))
	return c
}

func invoiceCloseCommand(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "close",
		Short: "Close every due period and sync to Stripe once, then exit",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, log, err := loadFor(g, "invoice")
			if err != nil {
				return err
			}
			iv, pool, ch, err := newInvoicer(cmd.Context(), cfg, nil, log)
			if err != nil {
				return err
			}
			defer pool.Close()
			defer ch.Close()
			return iv.Once(cmd.Context())
		},
	}
}

func invoiceCreditNoteCommand(g *globalFlags) *cobra.Command {
	var amount int64
	var reason, key string
	c := &cobra.Command{
		Use:   "credit-note INVOICE_ID",
		Short: "Append a credit note (in minor units) to a finalized invoice; the invoice itself is never edited",
		Long: `Append a credit note (in minor units) to a finalized invoice; the invoice itself is never edited.

Give --idempotency-key to make the command safe to run again (after a timeout,
say): a credit note appended before with the same key, invoice, amount and
reason is reported instead of appending a second one, and the key used for
anything else is refused.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, _, err := loadFor(g, "invoice")
			if err != nil {
				return err
			}
			if reason == "" {
				return errors.New("--reason is required")
			}
			if amount <= 0 {
				return fmt.Errorf("--amount: want a positive amount in minor units, got %d", amount)
			}
			if err := invoicer.ValidIdempotencyKey(key); err != nil {
				return fmt.Errorf("--idempotency-key: %w", err)
			}
			pool, err := openPostgres(cmd.Context(), cfg.Services.PostgresURL)
			if err != nil {
				return err
			}
			defer pool.Close()
			res, err := invpg.New(pool).AppendCreditNote(cmd.Context(), args[0], amount, reason, key)
			if err != nil {
				return err
			}
			if res.Replayed {
				fmt.Fprintf(cmd.OutOrStdout(), "credit note %d of %d was already appended to %s with this idempotency key; nothing appended\n", res.ID, amount, args[0])
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "credit note %d of %d appended to %s\n", res.ID, amount, args[0])
			return nil
		},
	}
	c.Flags().Int64Var(&amount, "amount", 0, "amount to credit, in minor units (positive)")
	c.Flags().StringVar(&reason, "reason", "", "why (kept in the ledger)")
	c.Flags().StringVar(&key, "idempotency-key", "", "a key of your choosing that makes a rerun of this command append nothing more (up to 255 printable characters)")
	return c
}

// replayOptions are the flags of `tollgate invoice replay`.
type replayOptions struct {
	since       string
	from, to    string
	scratch     string
	keepScratch bool
	skipLoad    bool
	reportJSON  string
	reportCSV   string
	batch       int
}

func invoiceReplayCommand(g *globalFlags) *cobra.Command {
	var o replayOptions
	c := &cobra.Command{
		Use:   "replay",
		Short: "Rebuild usage from the Kafka topic in a scratch database, recompute the ledger's invoices and report each as match or different",
		Long: `replay reads the usage topic (from the start, or from --since) into a fresh
ClickHouse database with the same decoding, deduplication and lateness rule as
ingest, recomputes every finalized invoice whose period starts in
[--from, --to) under the plan versions the ledger recorded, and writes a JSON
and a CSV report. It exits with status 3 when any invoice differs, and 1 when it cannot run.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, log, err := loadFor(g, "invoice", "ingest")
			if err != nil {
				return err
			}
			res, err := runReplay(cmd.Context(), cfg, o, log, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return summarize(cmd.OutOrStdout(), res)
		},
	}
	f := c.Flags()
	f.StringVar(&o.since, "since", "", "read the topic from this time (RFC 3339); default: from the start")
	f.StringVar(&o.from, "from", "", "audit invoices whose period starts at or after this time (RFC 3339); default: 5 minutes after --since, else all")
	f.StringVar(&o.to, "to", "", "audit invoices whose period starts before this time (RFC 3339); default: all")
	f.StringVar(&o.scratch, "scratch-database", "", "ClickHouse database to rebuild into (must not exist unless --skip-load); default: a fresh name")
	f.BoolVar(&o.keepScratch, "keep-scratch", false, "keep the scratch database afterwards")
	f.BoolVar(&o.skipLoad, "skip-load", false, "audit against an existing --scratch-database without reading Kafka")
	f.StringVar(&o.reportJSON, "report-json", "replay-report.json", "where to write the JSON report")
	f.StringVar(&o.reportCSV, "report-csv", "replay-report.csv", "where to write the CSV report")
	f.IntVar(&o.batch, "batch", 20000, "events per insert into the scratch database")
	return c
}

// ReplayReport is the JSON report.
type ReplayReport struct {
	Topic string     `json:"topic"`
	Since *time.Time `json:"since,omitempty"`
	// LogStart is the time of the first record the log still holds, when
	// retention (or a deletion of records) has removed older ones.
	LogStart *time.Time `json:"log_start,omitempty"`
	// From is where the audited invoices' periods start from (--from,
	// or its default after --since).
	From            *time.Time `json:"from,omitempty"`
	ScratchDatabase string     `json:"scratch_database"`
	RecordsRead     int64      `json:"records_read"`
	EventsLoaded    int64      `json:"events_loaded"`
	LateEvents      int64      `json:"late_events"`
	Rejected        int64      `json:"rejected_records"`
	LoadSeconds     float64    `json:"load_seconds"`
	Invoices        int        `json:"invoices"`
	Matching        int        `json:"matching"`
	// MatchingAtClose invoices match the log as it stood when they were
	// closed; ArrivedAfterClose events of their periods came later.
	MatchingAtClose   int                    `json:"matching_at_close"`
	ArrivedAfterClose int64                  `json:"arrived_after_close"`
	Different         int                    `json:"different"`
	Results           []invoicer.AuditResult `json:"results"`
}

func parseTime(flag, v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return t, fmt.Errorf("--%s: %w", flag, err)
	}
	return t, nil
}

func runReplay(ctx context.Context, cfg Config, o replayOptions, log *slog.Logger, stderr io.Writer) (ReplayReport, error) {
	var rep ReplayReport
	since, err := parseTime("since", o.since)
	if err != nil {
		return rep, err
	}
	from, err := parseTime("from", o.from)
	if err != nil {
		return rep, err
	}
	if o.from == "" && !since.IsZero() {
		// An invoice whose period starts before --since has events the
		// replay does not read: audited, every one would be "different".
		// So may one starting up to the clock skew an event may carry
		// after it (an event stamped ahead of its record's time).
		from = since.Add(schemas.MaxClockSkew)
	}
	to, err := parseTime("to", o.to)
	if err != nil {
		return rep, err
	}
	if to.IsZero() {
		to = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	if o.skipLoad && o.scratch == "" {
		return rep, errors.New("--skip-load needs --scratch-database")
	}
	if o.scratch == cfg.Services.ClickHouseDatabase {
		// Replay loads into, and by default drops, its scratch database:
		// never the live one.
		return rep, fmt.Errorf("--scratch-database %s is the live database (services.clickhouse_database); replay needs a database of its own", o.scratch)
	}
	if o.batch <= 0 {
		return rep, fmt.Errorf("--batch: want a positive number of events, got %d", o.batch)
	}
	scratch := o.scratch
	if scratch == "" {
		scratch = fmt.Sprintf("tollgate_replay_%d", time.Now().UnixNano())
	}
	rep.Topic, rep.ScratchDatabase = cfg.Ingest.Topic, scratch
	if !since.IsZero() {
		rep.Since = &since
	}
	if !from.IsZero() {
		rep.From = &from
	}
	pool, err := openPostgres(ctx, cfg.Services.PostgresURL)
	if err != nil {
		return rep, err
	}
	defer pool.Close()
	exists, err := clickHouseDatabaseExists(ctx, cfg.Services, scratch)
	switch {
	case err != nil:
		return rep, err
	case exists && !o.skipLoad:
		return rep, fmt.Errorf("scratch database %s already exists; replay only loads into a fresh one", scratch)
	case !exists && o.skipLoad:
		return rep, fmt.Errorf("scratch database %s does not exist; --skip-load audits one an earlier replay kept (--keep-scratch)", scratch)
	}
	ch, err := openClickHouse(ctx, cfg.Services, scratch)
	if err != nil {
		return rep, err
	}
	defer ch.Close()
	if !o.keepScratch && !o.skipLoad {
		// Only a database this run made is dropped: with --skip-load it
		// was there before, and stays.
		defer dropClickHouseDatabase(cfg.Services, scratch, log)
	}
	store := invpg.New(pool)
	kc, err := cfg.Services.kafkaCluster()
	if err != nil {
		return rep, err
	}
	klog := &invkafka.Log{Brokers: kc.brokers, Security: kc.sec, Topic: cfg.Ingest.Topic}
	if !o.skipLoad {
		if err := checkRetained(ctx, klog, store, from, to, &rep); err != nil {
			return rep, err
		}
	}
	invs, err := store.ClosedInvoices(ctx, from, to)
	if err != nil {
		return rep, err
	}
	if err := invch.CreateArrivedAfterClose(ctx, ch); err != nil {
		return rep, err
	}
	if !o.skipLoad {
		start := time.Now()
		// Which events arrived after their period's invoice was closed is
		// told against every closed invoice whose period the events read
		// can fall in (up to ingest's lateness before --since, and periods
		// run to two months after a zone change), not only those in
		// --from/--to.
		first := time.Time{}
		if !since.IsZero() {
			first = since.Add(-cfg.Ingest.MaxLateness).AddDate(0, -3, 0)
		}
		all, err := store.ClosedInvoices(ctx, first, time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC))
		if err != nil {
			return rep, err
		}
		if err := loadScratch(ctx, cfg, klog, ch, since, o.batch, newClosings(all), &rep, stderr); err != nil {
			return rep, err
		}
		rep.LoadSeconds = time.Since(start).Seconds()
	}
	iv, err := invoicer.New(store, nil, nil, nil, invoicer.Options{Meters: cfg.Meters}, log)
	if err != nil {
		return rep, err
	}
	bar := newBar(stderr, int64(len(invs)), "recomputing invoices")
	rep.Results, err = iv.Audit(ctx, invch.New(ch), invch.NewAsClosed(ch), invs, func(done, _ int) { _ = bar.Set(done) })
	_ = bar.Finish()
	if err != nil {
		return rep, err
	}
	rep.Invoices = len(rep.Results)
	for _, r := range rep.Results {
		switch r.Result {
		case invoicer.ResultMatch:
			rep.Matching++
		case invoicer.ResultMatchAtClose:
			rep.MatchingAtClose++
			rep.ArrivedAfterClose += r.ArrivedAfterClose
		default:
			rep.Different++
		}
	}
	if err := writeReports(rep, o.reportJSON, o.reportCSV); err != nil {
		return rep, err
	}
	return rep, nil
}

// checkRetained refuses a replay asked to prove invoices the log can no
// longer prove: retention (or a deletion of records) removed the oldest
// records, so an invoice whose period starts before the first record held
// (give or take the clock skew an event may carry) may have billed events
// the log no longer has. Read anyway, such an invoice came out "different"
// for a reason the report did not give, or, once as many events of its
// period had arrived late as were removed, matched the log: proved by
// events it never billed. The report records where the log begins.
func checkRetained(ctx context.Context, klog *invkafka.Log, store *invpg.Store, from, to time.Time, rep *ReplayReport) error {
	held, err := klog.Retained(ctx)
	if err != nil {
		return fmt.Errorf("read where the log begins: %w", err)
	}
	if held.IsZero() {
		return nil
	}
	rep.LogStart = &held
	provable := held.Add(schemas.MaxClockSkew)
	if !provable.After(from) {
		return nil
	}
	lost, err := store.ClosedInvoices(ctx, from, minTime(to, provable))
	if err != nil || len(lost) == 0 {
		return err
	}
	first := lost[0]
	return fmt.Errorf("the log no longer holds records before %s (removed by retention, or by a deletion of records): "+
		"%d closed invoices of periods starting before %s cannot be proved from it (the first: %s, account %s, period from %s); "+
		"audit the invoices it can prove with --from %s or later",
		held.UTC().Format(time.RFC3339), len(lost), provable.UTC().Format(time.RFC3339), first.ID, first.AccountID,
		first.Period.Start.UTC().Format(time.RFC3339), provable.UTC().Format(time.RFC3339))
}

// chString is s as a ClickHouse string literal.
func chString(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func newBar(w io.Writer, total int64, desc string) *progressbar.ProgressBar {
	return progressbar.NewOptions64(total, progressbar.OptionSetWriter(w), progressbar.OptionSetDescription(desc),
		progressbar.OptionShowCount(), progressbar.OptionShowIts(), progressbar.OptionThrottle(200*time.Millisecond),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(w) }))
}

// closings tell, per account, when the invoice of each period was closed.
type closings map[string][]invoicer.StoredInvoice

func newClosings(invs []invoicer.StoredInvoice) closings {
	c := closings{}
	for _, si := range invs {
		c[si.AccountID] = append(c[si.AccountID], si)
	}
	return c
}

// after reports whether a live event of account at t, carried by a record
// of recordTime, reached the log after its period's invoice was closed:
// after the close began reading the account's usage, or, for an invoice
// that does not record that, after the invoice was created (the close
// reads usage just before it creates the invoice, but when one account
// at a time is read, the last is read minutes before).
func (c closings) after(account string, t, recordTime time.Time) bool {
	if recordTime.IsZero() {
		return false
	}
	for _, si := range c[account] {
		if !t.Before(si.Period.Start) && t.Before(si.Period.End) {
			if read := si.Fingerprint.UsageReadAt; !read.IsZero() {
				return recordTime.After(read)
			}
			return recordTime.After(si.CreatedAt)
		}
	}
	return false
}

// loadScratch reads the topic into the scratch database exactly as ingest
// would have landed it: ingest.Split decodes, deduplicates and applies the
// lateness rule, and the ingest sink writes the same columns. The live
// events that reached the log after their period's invoice was closed are
// also listed in invch.ArrivedAfterClose.
func loadScratch(ctx context.Context, cfg Config, log *invkafka.Log, ch driver.Conn, since time.Time, batch int, closed closings, rep *ReplayReport, stderr io.Writer) error {
	sink := chsink.NewSink(ch)
	var bar *progressbar.ProgressBar
	now := time.Now()
	err := log.Read(ctx, since, batch, func(msgs []invkafka.Message) error {
		in := make([]ingest.Message, len(msgs))
		for i, m := range msgs {
			in[i] = ingest.Message{Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value, Time: m.Time}
		}
		events, late, rejected, _ := ingest.Split(in, now, cfg.Ingest.MaxLateness)
		// Before this batch lands: whether an earlier copy of an event
		// landed is read from what earlier batches landed.
		if err := insertArrivedAfterClose(ctx, ch, closed, events); err != nil {
			return err
		}
		if len(events) > 0 {
			if err := sink.Insert(ctx, events); err != nil {
				return err
			}
		}
		if len(late) > 0 {
			// A too-late copy of an event an earlier batch landed is a
			// duplicate, and left out, as ingest leaves it out.
			kept, err := sink.InsertLate(ctx, late)
			if err != nil {
				return err
			}
			late = kept
		}
		rep.RecordsRead += int64(len(msgs))
		rep.EventsLoaded += int64(len(events))
		rep.LateEvents += int64(len(late))
		rep.Rejected += int64(len(rejected))
		return nil
	}, func(done, total int64) {
		if bar == nil {
			bar = newBar(stderr, total, "reading "+cfg.Ingest.Topic)
		}
		_ = bar.Set64(done)
	})
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		return fmt.Errorf("load scratch database: %w", err)
	}
	return nil
}

// insertArrivedAfterClose lists the live events of records that reached
// the log after their period's invoice was closed, by the raw table's row
// key (event id, time, type). A record that repeats an event an earlier
// record already landed before the close (a client's retry after it, say)
// is no late arrival: the invoice counted that event. Run before the batch
// lands, so what landed is what earlier batches landed; an event's copies
// share a partition (the topic is keyed by account), so its first copy is
// read first.
func insertArrivedAfterClose(ctx context.Context, ch driver.Conn, closed closings, events []ingest.Record) error {
	var after []ingest.Record
	for _, r := range events {
		if r.Event.Environment == schemas.Live && closed.after(r.Event.AccountID, r.Event.Time, r.RecordTime) {
			after = append(after, r)
		}
	}
	if len(after) == 0 {
		return nil
	}
	type rowKey struct {
		id  uuid.UUID
		at  int64
		typ string
	}
	// The accounts and the span of times narrow the read to the chunk's
	// granules (both tables are sorted by account, then time): by event id
	// alone it read every row loaded so far, for every chunk with a late
	// event, and a long log's load grew with the square of its size.
	keysIn := func(table string, ids, accounts []string, lo, hi time.Time) (map[rowKey]bool, error) {
		rows, err := ch.Query(ctx, `SELECT event_id, timestamp, event_type FROM `+table+
			` WHERE account_id IN (`+strings.Join(accounts, ",")+`) AND timestamp >= toDateTime(?) AND timestamp <= toDateTime(?)
			AND event_id IN (`+strings.Join(ids, ",")+`)`, uint32(lo.Unix()), uint32(hi.Unix()))
		if err != nil {
			return nil, fmt.Errorf("look for earlier copies of late events: %w", err)
		}
		defer rows.Close()
		out := map[rowKey]bool{}
		for rows.Next() {
			var k rowKey
			var at time.Time
			if err := rows.Scan(&k.id, &at, &k.typ); err != nil {
				return nil, fmt.Errorf("look for earlier copies of late events: %w", err)
			}
			k.at = at.Unix()
			out[k] = true
		}
		return out, rows.Err()
	}
	var late []ingest.Record
	for lo := 0; lo < len(after); lo += 1000 {
		chunk := after[lo:min(lo+1000, len(after))]
		ids := make([]string, len(chunk))
		seen := map[string]bool{}
		var accounts []string
		lo, hi := chunk[0].Event.Time, chunk[0].Event.Time
		for i, r := range chunk {
			ids[i] = "toUUID('" + uuid.UUID(r.Event.ID).String() + "')"
			if !seen[r.Event.AccountID] {
				seen[r.Event.AccountID] = true
				accounts = append(accounts, chString(r.Event.AccountID))
			}
			lo, hi = minTime(lo, r.Event.Time), maxTime(hi, r.Event.Time)
		}
		landed, err := keysIn("usage_events", ids, accounts, lo, hi)
		if err != nil {
			return err
		}
		listed, err := keysIn(invch.ArrivedAfterClose, ids, accounts, lo, hi)
		if err != nil {
			return err
		}
		for _, r := range chunk {
			k := rowKey{uuid.UUID(r.Event.ID), r.Event.Time.Unix(), r.Event.Type}
			if !landed[k] || listed[k] {
				late = append(late, r)
			}
		}
	}
	if len(late) == 0 {
		return nil
	}
	b, err := ch.PrepareBatch(ctx, "INSERT INTO "+invch.ArrivedAfterClose+" (event_id, account_id, event_type, timestamp, record_time)")
	if err != nil {
		return fmt.Errorf("list events that arrived after the close: %w", err)
	}
	for _, r := range late {
		if err := b.Append(r.Event.ID, r.Event.AccountID, r.Event.Type, r.Event.Time.UTC(), r.RecordTime.UTC()); err != nil {
			return fmt.Errorf("list events that arrived after the close: %w", err)
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("list events that arrived after the close: %w", err)
	}
	return nil
}

func writeReports(rep ReplayReport, jsonPath, csvPath string) error {
	if jsonPath != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("write json report: %w", err)
		}
	}
	if csvPath != "" {
		f, err := os.Create(csvPath)
		if err != nil {
			return fmt.Errorf("write csv report: %w", err)
		}
		w := csv.NewWriter(f)
		_ = w.Write([]string{"invoice_id", "account_id", "period_start", "period_end", "currency", "ledger_total",
			"replay_total", "ledger_events", "replay_events", "ledger_hash", "replay_hash", "result", "differences",
			"arrived_after_close", "unbilled_total"})
		for _, r := range rep.Results {
			_ = w.Write([]string{r.InvoiceID, r.AccountID, r.PeriodStart.Format(time.RFC3339), r.PeriodEnd.Format(time.RFC3339),
				r.Currency, strconv.FormatInt(r.LedgerTotal, 10), strconv.FormatInt(r.ReplayTotal, 10),
				strconv.FormatInt(r.LedgerEvents, 10), strconv.FormatInt(r.ReplayEvents, 10), r.LedgerHash, r.ReplayHash,
				r.Result, strings.Join(r.Differences, "; "), strconv.FormatInt(r.ArrivedAfterClose, 10),
				strconv.FormatInt(r.UnbilledTotal, 10)})
		}
		w.Flush()
		if err := errors.Join(w.Error(), f.Close()); err != nil {
			return fmt.Errorf("write csv report: %w", err)
		}
	}
	return nil
}

// summarize prints the outcome and fails when any invoice differs.
// ExitInvoicesDiffer is `tollgate invoice replay`'s exit status when it ran
// and some invoice differs from the replayed usage; 1 is a replay that
// could not run (or was refused).
const ExitInvoicesDiffer = 3

func summarize(w io.Writer, rep ReplayReport) error {
	fmt.Fprintf(w, "read %d records (%d events, %d late, %d rejected) into %s\n", rep.RecordsRead, rep.EventsLoaded, rep.LateEvents, rep.Rejected, rep.ScratchDatabase)
	audited := ""
	if rep.From != nil {
		audited = " (periods starting at or after " + rep.From.UTC().Format(time.RFC3339) + ")"
	}
	if rep.LogStart != nil {
		fmt.Fprintf(w, "the log begins at %s: retention (or a deletion of records) removed older records, so invoices of periods starting before %s cannot be proved from it\n",
			rep.LogStart.UTC().Format(time.RFC3339), rep.LogStart.Add(schemas.MaxClockSkew).UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(w, "%d invoices%s: %d match, %d match the log as it stood at their close, %d different\n",
		rep.Invoices, audited, rep.Matching, rep.MatchingAtClose, rep.Different)
	for _, r := range rep.Results {
		switch r.Result {
		case invoicer.ResultDifferent:
			fmt.Fprintf(w, "DIFFERENT %s %s %s: %s\n", r.InvoiceID, r.AccountID, r.PeriodStart.Format("2006-01"), strings.Join(r.Differences, "; "))
		case invoicer.ResultMatchAtClose:
			fmt.Fprintf(w, "UNBILLED  %s %s %s: %d events arrived after the close; they would have added %s %s\n", r.InvoiceID,
				r.AccountID, r.PeriodStart.Format("2006-01"), r.ArrivedAfterClose, invoicer.FormatMinor(r.UnbilledTotal, r.Currency), strings.ToUpper(r.Currency))
		}
	}
	if rep.Different > 0 {
		return exitStatus{fmt.Errorf("%d of %d invoices differ from the replayed usage", rep.Different, rep.Invoices), ExitInvoicesDiffer}
	}
	if rep.Invoices == 0 {
		fmt.Fprintln(w, "no finalized invoice in the replayed range: nothing to prove")
		return nil
	}
	fmt.Fprintf(w, "zero difference: all %d invoices are proved by the raw event log\n", rep.Invoices)
	return nil
}

func adminClickHouse(svc Services) (driver.Conn, error) {
	opts, err := clickHouseOptions(svc, "default")
	if err != nil {
		return nil, err
	}
	return clickhouse.Open(opts)
}

func clickHouseDatabaseExists(ctx context.Context, svc Services, name string) (bool, error) {
	c, err := adminClickHouse(svc)
	if err != nil {
		return false, err
	}
	defer c.Close()
	var n uint64
	if err := c.QueryRow(ctx, "SELECT count() FROM system.databases WHERE name = ?", name).Scan(&n); err != nil {
		return false, fmt.Errorf("look up clickhouse database %s: %w", name, err)
	}
	return n > 0, nil
}

func dropClickHouseDatabase(svc Services, name string, log *slog.Logger) {
	if !chIdent.MatchString(name) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := adminClickHouse(svc)
	if err == nil {
		err = c.Exec(ctx, "DROP DATABASE IF EXISTS "+name)
		c.Close()
	}
	if err != nil {
		log.Warn("could not drop the scratch database", "database", name, "err", err)
	}
}
