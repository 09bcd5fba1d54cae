"""The results table: our figures, the 2011 baseline's, and the ratios."""


def _f(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:,.{digits}f}x"


def rows(r, s):
    out = []
    for n in s["live"]:
        for p in ("p50", "p99"):
            ours, base = r.get(f"syn_to_rule_{p}_ms_{n}"), r.get(f"base_syn_to_rule_{p}_ms_{n}")
            ref = r.get(f"ref_connect_{p}_ms")
            if ours and base:
                versus = _ratio(base, ours, 1) + " faster" if base >= ours else _ratio(ours, base, 1) + " slower"
            else:
                versus = "-"
            out.append((f"SYN seen to rules live {p}, ms, {n:,} live", ours, base, versus, ref,
                        f"+{ours - ref:.2f} ms" if ours is not None and ref is not None else "-"))
    n = s["live"][-1]
    out.append((f"harvest, closed conn/s ({r.get('harvest_k')} closed at once, {n:,} live)", r.get("harvest_per_s"),
                r.get("base_harvest_per_s"), _ratio(r.get("harvest_per_s"), r.get("base_harvest_per_s"), 1), None, "-"))
    out.append(("  the same from the service's own harvest timer (/metrics)", r.get("harvest_busy_per_s"), None, "-",
                None, "-"))
    out.append((f"sustained new tracked conn/s ({r.get('conn_offered_per_s')}/s offered for {s['churn_secs']} s, "
                f"{n:,} live)", r.get("conn_per_s"),
                r.get("base_conn_per_s"), _ratio(r.get("conn_per_s"), r.get("base_conn_per_s"), 1), None, "-"))
    out.append(("  of them missed (not logged with their bytes, or failed)",
                f"{r.get('missed')} of {r.get('conn_made', 0) + r.get('conn_errors', 0)}",
                f"{r.get('base_missed')} of {r.get('base_conn_made')}", "-", None, "-"))
    out.append(("  offered but not started in time (at most 2,000 wait at once)", r.get("churn_not_started"), None, "-",
                None, "-"))
    out.append(("  their connect() p50 / p99, ms", f"{r.get('churn_connect_p50_ms') or 0:.2f} / "
                f"{r.get('churn_connect_p99_ms') or 0:.2f}", None, "-", None, "-"))
    out.append((f"new tracked conn/s, {s['parallel']} clients each waiting for its last ({s['churn16_secs']} s)",
                r.get("conn_per_s_closed16"), None, "-", r.get("ref_conn_per_s"),
                _ratio(r.get("conn_per_s_closed16"), r.get("ref_conn_per_s"))))
    out.append(("  of them missed", f"{r.get('missed_closed16')} of {r.get('conn_made_closed16')}", None, "-",
                None, "-"))
    out.append(("  baseline capacity if connections outlived netstat (1 / (SYN-to-rules + harvest))", None,
                r.get("base_capacity_per_s"), _ratio(r.get("conn_per_s"), r.get("base_capacity_per_s"), 1), None,
                "-"))
    for key, label in (("tso", "TSO on"), ("1500", "1,500-byte packets"), ("tso_down", "TSO on, download"),
                       ("1500_down", "1,500-byte packets, download")):
        ref = r.get(f"ref_gbps_{key}")
        for kind, prefix in (("untracked flow, passes all rules", "gbps"), ("tracked flow, newest rules",
                                                                            "gbps_tracked")):
            ours = r.get(f"{prefix}_{key}")
            out.append((f"iperf3 Gbit/s, {label}, {kind} ({n:,} live)", ours, None, "-", ref, _ratio(ours, ref, 3)))
        bare, ours = r.get(f"bare_gbps_{key}"), r.get(f"gbps_{key}")
        out.append(("  untracked flow against a link in namespaces with no service (no tables, no conntrack)", ours,
                    None, "-", bare, _ratio(ours, bare, 3)))
    m = r.get("rss_at_connections")
    out.append((f"service RSS, MB ({m} tracked)", r.get("rss_mb"), None, "-", None, "-"))
    out.append((f"service RSS, MB ({n:,} tracked)", r.get(f"rss_mb_{n}"), None, "-", None, "-"))
    for label, key in (("0 tracked", "idle_cpu_pct_0"), (f"{n:,} tracked", f"idle_cpu_pct_{n}"),
                       (f"{m} tracked, first {s['idle_secs']} s", "idle_cpu_pct_first"),
                       (f"{m} tracked, the next {s['idle_cycle_secs']} s", "idle_cpu_pct")):
        out.append((f"service idle CPU, % of a core ({label})", r.get(key), None, "-", None, "-"))
    out.append((f"open rate, conn/s (up to {n:,} held, 128 at once)", r.get(f"open_per_s_{n}"), None, "-", None, "-"))
    out.append((f"shutdown, s ({r.get('shutdown_connections')} live harvested)", r.get("shutdown_s"), None, "-",
                None, "-"))
    return out


def table(r, s):
    head = ("measurement", "NetProfiler", "2011 baseline", "ours vs baseline", "rule-free", "ours vs rule-free")
    body = [tuple(_f(c) for c in row) for row in rows(r, s)]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, sep]
    for row in body:
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(out)
