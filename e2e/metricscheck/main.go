// metricscheck: reads a Prometheus text exposition (format 0.0.4) on stdin and parses it with
// Prometheus' own parser (github.com/prometheus/common/expfmt, classic metric names), then checks
// what the parser leaves to its callers: every family has HELP and TYPE, and every histogram has
// non-decreasing buckets ending with le="+Inf" equal to its _count. Exits 1 with the parser's error
// or the failed check; otherwise prints one JSON line per family (sorted by name):
//
//	{"name":"...","type":"COUNTER","help":"...","metrics":[{"labels":{...},"value":3}, ...]}
//
// (histograms: "count", "sum" and "buckets" [[le, cumulative], ...] instead of "value").
// Built by e2e/build.sh into the same cache as the control plane.
package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

type metric struct {
	Labels  map[string]string `json:"labels"`
	Value   *float64          `json:"value,omitempty"`
	Count   *float64          `json:"count,omitempty"`
	Sum     *float64          `json:"sum,omitempty"`
	Buckets [][2]any          `json:"buckets,omitempty"`
}

type family struct {
	Name    string   `json:"name"`
	Type    string   `json:"type"`
	Help    string   `json:"help"`
	Metrics []metric `json:"metrics"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "metricscheck: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(os.Stdin)
	if err != nil {
		fail("%v", err)
	}
	if len(families) == 0 {
		fail("no metric families in the input")
	}
	names := make([]string, 0, len(families))
	for name := range families {
		names = append(names, name)
	}
	sort.Strings(names)
	out := json.NewEncoder(os.Stdout)
	for _, name := range names {
		mf := families[name]
		if mf.Help == nil {
			fail("%s: no # HELP line", name)
		}
		if mf.GetType() == dto.MetricType_UNTYPED {
			fail("%s: no # TYPE line (untyped)", name)
		}
		f := family{Name: name, Type: mf.GetType().String(), Help: mf.GetHelp()}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, pair := range m.GetLabel() {
				labels[pair.GetName()] = pair.GetValue()
			}
			entry := metric{Labels: labels}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				v := m.GetCounter().GetValue()
				if v < 0 || math.IsNaN(v) {
					fail("%s%v: counter value %v", name, labels, v)
				}
				entry.Value = &v
			case dto.MetricType_GAUGE:
				v := m.GetGauge().GetValue()
				entry.Value = &v
			case dto.MetricType_HISTOGRAM:
				h := m.GetHistogram()
				count, sum := float64(h.GetSampleCount()), h.GetSampleSum()
				entry.Count, entry.Sum = &count, &sum
				previous, previousBound := 0.0, math.Inf(-1)
				for _, b := range h.GetBucket() {
					cumulative := float64(b.GetCumulativeCount())
					if b.GetUpperBound() <= previousBound {
						fail("%s%v: bucket le=%v after le=%v", name, labels, b.GetUpperBound(), previousBound)
					}
					if cumulative < previous {
						fail("%s%v: bucket le=%v has %v, fewer than the bucket before (%v)", name, labels, b.GetUpperBound(), cumulative, previous)
					}
					previous, previousBound = cumulative, b.GetUpperBound()
					entry.Buckets = append(entry.Buckets, [2]any{fmt.Sprint(b.GetUpperBound()), cumulative})
				}
				if !math.IsInf(previousBound, 1) {
					fail("%s%v: no le=\"+Inf\" bucket", name, labels)
				}
				if previous != count {
					fail("%s%v: le=\"+Inf\" bucket %v but _count %v", name, labels, previous, count)
				}
			default:
				v := m.GetUntyped().GetValue()
				entry.Value = &v
			}
			f.Metrics = append(f.Metrics, entry)
		}
		if err := out.Encode(f); err != nil {
			fail("%v", err)
		}
	}
}
