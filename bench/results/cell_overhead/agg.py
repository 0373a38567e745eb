import sys, collections
for path in sys.argv[1:]:
    total = 0; incl = collections.Counter(); leaf = collections.Counter(); thread = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        n = int(n); total += n
        frames = stack.split(";")
        thread[frames[0][:40]] += n
        seen = set()
        for f in frames[1:]:
            key = f.split(" (")[0]
            if key not in seen:
                incl[key] += n; seen.add(key)
        leaf[frames[-1]] += n
    print(path, "samples", total)
    print(" threads:", thread.most_common(5))
    print(" inclusive:"); [print(f"   {n/total:6.1%} {k}") for k, n in incl.most_common(45)]
    print(" leaf:"); [print(f"   {n/total:6.1%} {k}") for k, n in leaf.most_common(15)]
