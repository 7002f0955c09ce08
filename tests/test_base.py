from game.base import convert_gguf, embedded_gguf


def test_a_conversion_another_process_finished_first_is_kept(tmp_path):
    # Two evaluations started at once on a fresh cache convert the same GGUF; the second must use the first's folder.
    out = tmp_path / "base"
    out.mkdir()
    (out / "config.json").write_text('{"written by": "the other process"}')
    convert_gguf(embedded_gguf(), out)
    assert (out / "config.json").read_text() == '{"written by": "the other process"}'
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # its own copy is cleaned up
