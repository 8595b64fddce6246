// Package chcompat proves that the ClickHouse SQL Tollgate issues runs, with
// the same results, on the two ClickHouse releases it supports: 18.16, which
// deploy/local/services.sh installs, and 24.8, which docker-compose.yml pins.
//
// Its test drives the real ClickHouse code (the raw-event sink, the rollup
// store, the usage API's reads, the invoicer's usage reads) against a
// ClickHouse 18.16 server and records every statement the client sends,
// with the rows of every native insert and the answer of every read. Then
// replay.py runs the same statements, in the same order, on chdb 2.1.1,
// which embeds ClickHouse 24.8.4's engine, and the test compares every
// answer and the final contents of every table.
package chcompat
