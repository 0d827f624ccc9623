from core.launch import Launch, launch


def test_without_a_launcher_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch() == Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert not launch().distributed


def test_reads_what_torchrun_sets(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    process = launch()
    assert (process.rank, process.world_size, process.local_rank, process.local_world_size) == (3, 4, 1, 4)
    assert process.distributed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch().local_world_size == 2


def test_one_process_joins_a_gloo_group_of_one_once(monkeypatch):
    import torch

    from core.launch import init_process_group

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    init_process_group()
    group = torch.distributed.group.WORLD
    assert torch.distributed.get_backend() == "gloo"
    assert (torch.distributed.get_rank(), torch.distributed.get_world_size()) == (0, 1)
    init_process_group()  # a second caller (the stage runner, then the trainer) finds the group and keeps it
    assert torch.distributed.group.WORLD is group
    torch.distributed.destroy_process_group()
