cd /work/main
M=~/.cache/compresskv/models/SmolLM2-135M-Instruct.Q4_1.gguf; E=~/.cache/compresskv/data/PaulGrahamEssays
C="-n 24 --temp 0 --seed 1 -c 4608 -t 2 -no-cnv --no-display-prompt --no-warmup --simple-io"
for d in 0.1 0.3 0.7 0.9; do python3 bench/needle.py --essays $E --chars 14000 --depth $d > target/e2e/g$d.txt; done
for v in "full" "-w 8 -a end" "-w 8 -a question" "-w 8 -a question -k 16" "-w 16 -a question -k 16" "-w 16 -a question -p 15" "-w 32 -a question -k 16"; do
  for d in 0.1 0.3 0.7 0.9; do
    if [ "$v" = full ]; then f=""; else f="--compresskv --compresskv-budget 256 $(echo $v | sed 's/-w /--compresskv-window /; s/-a /--compresskv-window-anchor /; s/-k /--compresskv-chunk /; s/-p /--compresskv-pool /')"; fi
    a=$(vendor/build/bin/llama-completion -m $M -f target/e2e/g$d.txt $C $f 2>/dev/null | tr '\n' ' ')
    echo "$a" > /tmp/ans.txt; sc=$(python3 bench/needle.py --essays $E --score /tmp/ans.txt)
    echo "$v | d$d | $sc | $a"
  done
done
