package daemon

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/state"
)

// TestPlanMigration: what the migration watch does for one attachment,
// from its state and the migration tracker's answers.
func TestPlanMigration(t *testing.T) {
	const running, succeeded, failed = kubevirt.MigrationRunning, kubevirt.MigrationSucceeded, kubevirt.MigrationFailed
	cases := []struct {
		name string
		f    migrationFacts
		want migrationPlan
	}{
		{
			"held target, migration running: watch for the guest",
			migrationFacts{held: true, target: true, outcome: running},
			migrationPlan{watchGuest: true},
		},
		{
			"held target, migration succeeded: release",
			migrationFacts{held: true, target: true, outcome: succeeded},
			migrationPlan{release: true, phase: "Succeeded"},
		},
		{
			"held target, migration failed: stays held, failure recorded once",
			migrationFacts{held: true, target: true, outcome: failed},
			migrationPlan{failed: true, phase: "Failed"},
		},
		{
			"held target, failure already recorded: nothing",
			migrationFacts{held: true, target: true, outcome: failed, recorded: "Failed"},
			migrationPlan{},
		},
		{
			"held without a migration on record (a silenced source): nothing",
			migrationFacts{held: true, outcome: succeeded},
			migrationPlan{},
		},
		{
			"source whose VM moved away: silence",
			migrationFacts{migratedAway: true, guards: true, inFlight: true, stage: "Running"},
			migrationPlan{silence: true},
		},
		{
			"silenced source: nothing",
			migrationFacts{silenced: true, migratedAway: true, guards: true},
			migrationPlan{},
		},
		{
			"source without guards (bridge), migration in flight: nothing",
			migrationFacts{inFlight: true, stage: "PreparingTarget"},
			migrationPlan{},
		},
		{
			// The next target is wired before the VMI shows its migration.
			"guarding source, no migration shown: DAD guard, claims answered",
			migrationFacts{guards: true},
			migrationPlan{guard: true, dadGuard: true, claims: true},
		},
		{
			"guarding source once the migration is handed off: DAD guard, claims, reassert",
			migrationFacts{guards: true, inFlight: true, stage: "PreparingTarget"},
			migrationPlan{guard: true, dadGuard: true, claims: true, reassert: true},
		},
		{
			"guarding source, stage already reasserted",
			migrationFacts{guards: true, inFlight: true, stage: "TargetReady", reasserted: true},
			migrationPlan{guard: true, dadGuard: true, claims: true},
		},
		{
			"guarding source once memory moves: no claims contested",
			migrationFacts{guards: true, inFlight: true, stage: "Running"},
			migrationPlan{guard: true, dadGuard: true, reassert: true},
		},
	}
	for _, c := range cases {
		if got := planMigration(c.f); got != c.want {
			t.Errorf("%s:\n got %+v\nwant %+v", c.name, got, c.want)
		}
	}
}

func TestGapNote(t *testing.T) {
	first := time.Date(2026, 12, 7, 10, 0, 1, 250_000_000, time.UTC)
	rec := &state.Record{
		IfName: "net1", Network: "blue", Mode: "bridge",
		Migration: &state.Migration{Job: "mig-1", FirstFrame: first},
	}
	for _, c := range []struct {
		name     string
		last     time.Time
		reported bool
		gap      time.Duration
		measured bool
		says     string
	}{
		{"measured", first.Add(-312 * time.Millisecond), true, 312 * time.Millisecond, true, "network gap 312ms, from the guest's last frame on the source (2026-12-07T10:00:00.938Z)"},
		{"quiet source", time.Time{}, true, 0, false, "the guest sent nothing on the source"},
		{"no report", time.Time{}, false, 0, false, "did not report the guest's last frame within 2m0s"},
		{"clocks disagree", first.Add(40 * time.Millisecond), true, -40 * time.Millisecond, false, "is 40ms before its last on the source"},
	} {
		note, gap, measured := gapNote(rec, c.last, c.reported)
		if gap != c.gap || measured != c.measured || !strings.Contains(note, c.says) ||
			!strings.HasPrefix(note, `live migration mig-1, interface net1 (network "blue", mode bridge): `) {
			t.Errorf("%s: gapNote = %q, %v, %v; want gap %v, measured %v, saying %q", c.name, note, gap, measured, c.gap, c.measured, c.says)
		}
	}
}

func TestMigrationGapHistogram(t *testing.T) {
	m := NewMetrics()
	m.MigrationGap("bridge", 312*time.Millisecond)
	m.MigrationGap("passt", 1200*time.Millisecond)
	var nilMetrics *Metrics
	nilMetrics.MigrationGap("bridge", time.Second) // counts nothing, no panic
	want := `
# HELP vmnic_migration_network_gap_seconds Live migrations' network gap, measured on the target: from the last frame the VM's guest sent on the source node to the first it sent on this one, by mode.
# TYPE vmnic_migration_network_gap_seconds histogram
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.01"} 0
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.025"} 0
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.05"} 0
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.1"} 0
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.25"} 0
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="0.5"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="1"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="2.5"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="5"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="10"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="30"} 1
vmnic_migration_network_gap_seconds_bucket{mode="bridge",le="+Inf"} 1
vmnic_migration_network_gap_seconds_sum{mode="bridge"} 0.312
vmnic_migration_network_gap_seconds_count{mode="bridge"} 1
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.01"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.025"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.05"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.1"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.25"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="0.5"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="1"} 0
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="2.5"} 1
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="5"} 1
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="10"} 1
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="30"} 1
vmnic_migration_network_gap_seconds_bucket{mode="passt",le="+Inf"} 1
vmnic_migration_network_gap_seconds_sum{mode="passt"} 1.2
vmnic_migration_network_gap_seconds_count{mode="passt"} 1
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "vmnic_migration_network_gap_seconds"); err != nil {
		t.Error(err)
	}
}
