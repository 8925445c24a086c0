"""Prints the benchmark figures from results.txt against their targets."""

import sys

results = {}
with open(sys.argv[1]) as handle:
    for line in handle:
        key, _, value = line.rstrip("\n").partition(" ")
        results[key] = value


def number(key):
    value = results.get(key)
    return None if value is None else float(value.split()[0])


MIB = 1024 * 1024
rows = []


def check(name, value, target, passed, note=""):
    verdict = "n/a" if value is None else ("met" if passed else "MISSED")
    rows.append((name, "not measured" if value is None else value, target, verdict, note))


rss = number("rss.vm_rss_kib")
check("resident memory after polling", None if rss is None else f"{rss / 1024:.1f} MiB", "<= 8 MiB (aim 5 MiB)", rss is not None and rss <= 8 * 1024,
      f"anonymous {number('rss.anonymous_kib') / 1024:.1f} MiB, the rest is the binary's mapped pages" if number("rss.anonymous_kib") is not None else "")
for arch in ("x86_64", "aarch64", "armv7"):
    size = number(f"binary.{arch}_bytes")
    check(f"stripped binary {arch}", None if size is None else f"{size / MIB:.2f} MiB", "<= 8 MiB", size is not None and size <= 8 * MIB)
cpu = number("poll.cpu_ms_per_poll")
check("CPU per quiet poll", None if cpu is None else f"{cpu} ms", "< 20 ms", cpu is not None and cpu < 20)
advertisements = number("poll.git_ref_advertisements_per_poll")
check("git ref advertisements per poll", advertisements, "1", advertisements is not None and advertisements <= 1)
manifests = number("poll.registry_requests_per_poll")
check("registry requests per poll", manifests, "<= 1 manifest check per image (2 images)", manifests is not None and manifests <= 2)
downloaded = number("poll.bytes_downloaded_per_poll")
check("bytes downloaded per poll (git)", downloaded, "no image pull", downloaded is not None and downloaded < 64 * 1024)
agent = number("update.agent_ms_mean")
budget = number("update.budget_ms")
check("update with images present", None if agent is None else f"{agent:.0f} ms (x{results.get('update.ratio', '?')} of plain compose)",
      f"<= 1.2 x plain + 0.5 s = {budget:.0f} ms" if budget else "<= 1.2 x plain + 0.5 s", agent is not None and budget is not None and agent <= budget)
record = number("journal.transition_record_bytes")
check("journal transition record", None if record is None else f"{record:.0f} bytes", "< 64 bytes", record is not None and record < 64)
recovery = number("journal.recovery_ms")
check("journal recovery (nearly full region)", None if recovery is None else f"{recovery} ms", "< 10 ms", recovery is not None and recovery < 10)
handover = number("handover.ratio")
check("handover against docker run -d", None if handover is None else f"{number('handover.ms_median'):.0f} ms (x{handover} of docker run -d)", "<= 3 x, confirmation excluded", handover is not None and handover <= 3)
overlaps = number("handover.steps_under_older_lease")
check("steps with two agents acting", overlaps, "0 (from the journal)", overlaps is not None and overlaps == 0)

width = max(len(row[0]) for row in rows)
for name, value, target, verdict, note in rows:
    print(f"{name:<{width}}  {str(value):<34} {target:<42} {verdict:<7} {note}")
