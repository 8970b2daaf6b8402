#!/usr/bin/env bash
# On a machine with a GPU: ncu's memory counters of the decode kernel and of cuDNN's (torch SDPA) on the same
# caches (bench/decode_profile.py), for the shapes given as BATCHxCACHE (default 32x32768 128x4096). Results under
# $OUT (ncu holds the clocks at base, so compare the two kernels, not these times with the benchmark's).
set -uo pipefail
source bench/gpu_build_python.sh
metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,lts__t_sector_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_ltcfabric.sum
metrics+=,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,smsp__inst_executed.sum
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size
metrics+=,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_shared_mem
metrics+=,smsp__sass_inst_executed_op_ldgsts.sum,smsp__sass_inst_executed_op_global_ld.sum
metrics+=,l1tex__t_bytes_pipe_lsu_mem_global_op_ldgsts.sum,l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum
metrics+=,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio
metrics+=,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio
metrics+=,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio
for shape in ${@:-32x32768 128x4096}; do
  for who in ours cudnn; do
    flag=(); [ "$who" = cudnn ] && flag=(--cudnn)
    (cd bench && ncu --metrics "$metrics" -k 'regex:^attention_decode$|fprop|sdpa|flash' --launch-skip 4 \
      --launch-count 1 --csv python3 decode_profile.py --batch "${shape%x*}" --cache "${shape#*x}" "${flag[@]}") \
      > "$out/ncu_${who}_${shape}.csv" 2>&1
  done
done
