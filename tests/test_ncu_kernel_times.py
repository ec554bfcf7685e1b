"""tools/ncu_kernel_times.py on a CSV in Nsight Compute's format (--csv --print-units base)."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ncu_kernel_times", ROOT / "tools" / "ncu_kernel_times.py")
nkt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nkt)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(i, kernel, grid, metric, unit, value):
    return (f'"{i}","1","python3","h","{kernel}","1","7","(128, 1, 1)","{grid}","0","9.0",'
            f'"Command line profiler metrics","{metric}","{unit}","{value}"')


def write_csv(tmp_path):
    a = "void nsa::cuda::decode::decode_cmp_kernel<__nv_bfloat16, 128, 128, 1>(nsa::DecodeParams, nsa::cuda::decode::Workspace)"
    b = "nsa::cuda::decode::decode_select_kernel(nsa::DecodeParams, nsa::cuda::decode::Workspace)"
    lines = ["==PROF== Connected to process 1", HEADER]
    # three launches of each kernel: the first (warm-up) slower
    for i, (ta, tb) in enumerate([(90000, 9000), (10000, 3000), (12000, 5000)]):
        lines.append(row(2 * i, a, "(64, 4, 1)", "gpu__time_duration.sum", "nsecond", f"{ta:,}"))
        lines.append(row(2 * i, a, "(64, 4, 1)", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "%", "50"))
        lines.append(row(2 * i + 1, b, "(16, 4, 1)", "gpu__time_duration.sum", "nsecond", str(tb)))
        lines.append(row(2 * i + 1, b, "(16, 4, 1)", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "%", "2"))
    path = tmp_path / "k.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_means_skip_the_first_launches(tmp_path):
    means, counts = nkt.kernel_means(nkt.read_rows(write_csv(tmp_path)), skip=1)
    keys = list(means)
    assert [k[0] for k in keys] == ["nsa::cuda::decode::decode_cmp_kernel", "nsa::cuda::decode::decode_select_kernel"]
    assert means[keys[0]]["gpu__time_duration.sum"] == 11000 and counts[keys[0]] == 2
    assert means[keys[1]]["gpu__time_duration.sum"] == 4000
    assert means[keys[1]]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 2


def test_table_in_us_with_the_sum(tmp_path, capsys):
    assert nkt.main([str(write_csv(tmp_path)), "--skip", "1"]) == 0
    out = capsys.readouterr().out
    assert "| nsa::cuda::decode::decode_cmp_kernel | (64, 4, 1) | (128, 1, 1) | 2 | 11.0 | 50.0 |" in out
    assert "sum of the kernels' means: 15.0 us" in out


def test_no_rows(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("==ERROR== nothing profiled\n")
    assert nkt.main([str(path)]) == 1
    assert "no kernel rows" in capsys.readouterr().out


def test_short_names_of_the_columns():
    assert nkt.short("gpu__time_duration.sum") == "us"
    assert nkt.short("smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio") == "stall no instruction"
    assert nkt.short("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio") == (
        "stall long scoreboard")
    assert nkt.short("lts__t_bytes.sum") == "lts__t_bytes.sum"
