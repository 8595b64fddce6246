// Command tollgate runs Tollgate's components: one sub-command per component
// and `all` to run every component in one process.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	edgepg "github.com/tollgate-dev/tollgate/edge/postgres"
	"github.com/tollgate-dev/tollgate/internal/gctune"
)

func main() {
	gctune.Apply()
	// Every command stops on SIGINT or SIGTERM through its context: a
	// replay drops its scratch database, a close stops between steps.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// Only the first signal is caught: a second one ends the process at
	// once, as the operator who sends it means (it was caught too, and did
	// nothing, however long the stop took).
	context.AfterFunc(ctx, stop)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tollgate:", err)
		os.Exit(exitCode(err))
	}
}

// exitStatus is an error that ends the process with its own exit status.
type exitStatus struct {
	error
	code int
}

func (e exitStatus) Unwrap() error { return e.error }

// exitCode is the process's exit status for err: 1, unless err says
// otherwise (replay exits 3 when it ran and an invoice differs, so a script
// tells a wrong ledger from an audit that could not run).
func exitCode(err error) int {
	var e exitStatus
	if errors.As(err, &e) {
		return e.code
	}
	return 1
}

type globalFlags struct {
	config   string
	logLevel string
	logJSON  bool
	// stderr is where logs go: the root command's error output, which a
	// test may set.
	stderr func() io.Writer
}

func newRootCommand() *cobra.Command {
	var g globalFlags
	root := &cobra.Command{
		Use:           "tollgate",
		Short:         "Run an HTTP API as a product: keys, limits, metering, usage and invoices",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	g.stderr = root.ErrOrStderr
	root.PersistentFlags().StringVarP(&g.config, "config", "c", os.Getenv("TOLLGATE_CONFIG"), "configuration file (YAML); env TOLLGATE_CONFIG")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "debug, info, warn or error")
	root.PersistentFlags().BoolVar(&g.logJSON, "log-json", false, "log as JSON lines")
	for _, c := range subcommands(&g) {
		root.AddCommand(c)
	}
	return root
}

// subcommands is every sub-command; each component registers its own.
func subcommands(g *globalFlags) []*cobra.Command {
	return []*cobra.Command{
		componentCommand(g, "edge", "Authenticate, limit, proxy and meter API calls", edgeComponent),
		componentCommand(g, "ingest", "Land usage events from Kafka in ClickHouse", ingestComponent),
		aggregateCommand(g),
		invoiceCommand(g),
		componentCommand(g, "dashboard", "Serve the customer dashboard", dashboardComponent),
		componentCommand(g, "all", "Run every component in one process", allComponents),
		checkConfigCommand(g),
		migrateCommand(g),
		demoCommand(g),
		auditCommand(g),
	}
}

// loadFor builds the logger and loads the configuration, validated for
// components (none: every component).
func loadFor(g *globalFlags, components ...string) (Config, *slog.Logger, error) {
	cfg, log, err := loadWith(g)
	if err != nil {
		return cfg, nil, err
	}
	if err := cfg.Validate(components...); err != nil {
		return cfg, nil, fmt.Errorf("invalid configuration:\n%w", err)
	}
	for _, w := range cfg.Warnings(components...) {
		log.Warn("configuration: " + w)
	}
	return cfg, log, nil
}

func (g *globalFlags) logger() (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var w io.Writer = os.Stderr
	if g.stderr != nil {
		w = g.stderr()
	}
	if g.logJSON {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// warnSecretsInFile logs the configuration's secrets written in its file,
// for a command that neither validates for a component nor goes through
// loadFor (which logs every warning).
func warnSecretsInFile(log *slog.Logger, cfg Config) {
	for _, w := range cfg.secretsInFile {
		log.Warn("configuration: " + w)
	}
}

// component is what every component's Main provides.
type component interface {
	Run(ctx context.Context) error
	Close() error
}

type named struct {
	name string
	c    component
}

// starter builds the components a sub-command runs, in start order.
type starter func(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error)

func edgeComponent(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	m, err := NewEdgeMain(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return []named{{"edge", m}}, nil
}

func ingestComponent(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	m, err := NewIngestMain(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return []named{{"ingest", m}}, nil
}

// allComponents starts the pipeline back to front, so each stage's consumer
// is up before its producer, and stops it front to back.
func allComponents(ctx context.Context, cfg Config, log *slog.Logger) ([]named, error) {
	var out []named
	for _, s := range []starter{invoiceComponent, aggregateComponent, ingestComponent, edgeComponent} {
		cs, err := s(ctx, cfg, log)
		if err != nil {
			closeAll(log, out)
			return nil, err
		}
		out = append(out, cs...)
	}
	dash, err := dashboardAfter(cfg, log, out)
	if err != nil {
		closeAll(log, out)
		return nil, err
	}
	return append(out, dash...), nil
}

func componentCommand(g *globalFlags, name, short string, start starter) *cobra.Command {
	return &cobra.Command{
		Use:   name,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			only := []string{name}
			if name == "all" {
				only = nil
			}
			cfg, log, err := loadFor(g, only...)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			context.AfterFunc(ctx, stop) // a second signal ends the process (main)
			sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			comps, err := start(sctx, cfg, log)
			cancel()
			if err != nil {
				return err
			}
			return runComponents(ctx, log, comps)
		},
	}
}

// closeTimeout bounds each component's Close once its Run has returned.
const closeTimeout = 30 * time.Second

// runComponents runs every component until ctx ends or one fails, then stops
// them in reverse start order, each with a deadline.
func runComponents(ctx context.Context, log *slog.Logger, comps []named) error {
	return runComponentsWithin(ctx, log, comps, closeTimeout)
}

// runComponentsWithin is runComponents giving each Close closeWithin.
func runComponentsWithin(ctx context.Context, log *slog.Logger, comps []named, closeWithin time.Duration) error {
	type result struct {
		i   int
		err error
	}
	cancels := make([]context.CancelFunc, len(comps))
	done := make([]chan struct{}, len(comps))
	results := make(chan result, len(comps))
	for i, n := range comps {
		cctx, cancel := context.WithCancel(context.Background())
		cancels[i], done[i] = cancel, make(chan struct{})
		go func() {
			defer close(done[i])
			results <- result{i, n.c.Run(cctx)}
		}()
	}
	var first error
	select {
	case <-ctx.Done():
		log.Info("shutting down; a second signal ends the process at once")
	case r := <-results:
		if r.err != nil {
			first = fmt.Errorf("%s: %w", comps[r.i].name, r.err)
			log.Error("component failed; shutting down", "component", comps[r.i].name, "err", r.err)
		}
	}
	// The errors of the components' stops count too (an edge that could
	// not finish its calls within its deadline, say): they were dropped,
	// and the process said it stopped cleanly.
	stopped := func() {
		for {
			select {
			case r := <-results:
				if r.err != nil && !errors.Is(r.err, context.Canceled) {
					log.Error("component stopped with an error", "component", comps[r.i].name, "err", r.err)
					first = errors.Join(first, fmt.Errorf("%s: %w", comps[r.i].name, r.err))
				}
			default:
				return
			}
		}
	}
	for i := len(comps) - 1; i >= 0; i-- {
		cancels[i]()
		select {
		case <-done[i]:
		case <-time.After(30 * time.Second):
			log.Error("component did not stop in time", "component", comps[i].name)
		}
		stopped()
		// Close has a deadline too: one stuck on a dependency gone silent
		// kept the components after it from stopping at all.
		closed := make(chan error, 1)
		go func(c component) { closed <- c.Close() }(comps[i].c)
		select {
		case err := <-closed:
			if err != nil {
				log.Error("close component", "component", comps[i].name, "err", err)
				first = errors.Join(first, err)
			}
			log.Info("stopped", "component", comps[i].name)
		case <-time.After(closeWithin):
			log.Error("component did not close in time; stopping the others", "component", comps[i].name, "waited", closeWithin)
			first = errors.Join(first, fmt.Errorf("%s: did not close within %s", comps[i].name, closeWithin))
		}
	}
	return first
}

func closeAll(log *slog.Logger, comps []named) {
	for i := len(comps) - 1; i >= 0; i-- {
		if err := comps[i].c.Close(); err != nil {
			log.Error("close component", "component", comps[i].name, "err", err)
		}
	}
}

func checkConfigCommand(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "check-config",
		Short: "Validate the configuration without starting anything",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadConfig(g.config)
			if err != nil {
				return err
			}
			if err := cfg.Validate(); err != nil {
				return fmt.Errorf("invalid configuration:\n%w", err)
			}
			for _, w := range cfg.Warnings() {
				fmt.Fprintln(cmd.OutOrStdout(), "warning: "+w)
			}
			fmt.Fprintln(cmd.OutOrStdout(), "configuration is valid")
			return nil
		},
	}
}

// loadWarned builds the logger and loads the configuration, unvalidated,
// warning of secrets written in the file: for the commands that start no
// component (migrate, demo, audit), which check what they use as they go.
func loadWarned(g *globalFlags) (Config, *slog.Logger, error) {
	cfg, log, err := loadWith(g)
	if err != nil {
		return cfg, nil, err
	}
	warnSecretsInFile(log, cfg)
	return cfg, log, nil
}

// loadWith builds the logger and loads the configuration as it is.
func loadWith(g *globalFlags) (Config, *slog.Logger, error) {
	log, err := g.logger()
	if err != nil {
		return Config{}, nil, err
	}
	cfg, err := LoadConfig(g.config)
	return cfg, log, err
}

func migrateCommand(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "migrate",
		Short: "Apply the Postgres migrations and the ClickHouse DDL",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, _, err := loadWarned(g)
			if err != nil {
				return err
			}
			pool, err := openPostgres(cmd.Context(), cfg.Services.PostgresURL)
			if err != nil {
				return err
			}
			pool.Close()
			ch, err := openClickHouse(cmd.Context(), cfg.Services, cfg.Services.ClickHouseDatabase)
			if err != nil {
				return err
			}
			ch.Close()
			fmt.Fprintln(cmd.OutOrStdout(), "schemas are up to date")
			return nil
		},
	}
}

func auditCommand(g *globalFlags) *cobra.Command {
	audit := &cobra.Command{
		Use:   "audit",
		Short: "Look after the audit log",
		Args:  cobra.NoArgs,
	}
	var olderThan time.Duration
	prune := &cobra.Command{
		Use:   "prune",
		Short: "Delete the audit rows of failed authentications older than --older-than (key events are kept)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if olderThan < edgepg.MinFailedAuthRetention {
				return fmt.Errorf("--older-than %s: keep at least %s of failed authentications", olderThan, edgepg.MinFailedAuthRetention)
			}
			cfg, _, err := loadWarned(g)
			if err != nil {
				return err
			}
			pool, err := openPostgres(cmd.Context(), cfg.Services.PostgresURL)
			if err != nil {
				return err
			}
			defer pool.Close()
			before := time.Now().Add(-olderThan)
			n, err := edgepg.PruneFailedAuth(cmd.Context(), pool, before, "cli")
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %d audit rows of failed authentications recorded before %s\n", n, before.UTC().Format(time.RFC3339))
			return nil
		},
	}
	prune.Flags().DurationVar(&olderThan, "older-than", 0, "delete the failed authentications recorded longer ago than this (at least 24h; 2160h is 90 days)")
	_ = prune.MarkFlagRequired("older-than")
	audit.AddCommand(prune)
	return audit
}
