"""Length-bucketed batch sampler (batches of similar total length)."""
import random

from torch.utils.data import Sampler


class TokenBucketSampler(Sampler):
    """Shuffles ids, sorts each bucket of ``bucket_size`` by length (longest first) and cuts
    it into batches of at most ``batch_size`` tokens (padded length x batch), batch sizes
    being multiples of ``size_multiple``; the batches are shuffled again."""

    def __init__(self, lens, bucket_size, batch_size, droplast=False, size_multiple=8):
        self._lens = lens
        self._max_tok = batch_size
        self._bucket_size = bucket_size
        self._droplast = droplast
        self._size_mul = size_multiple

    def __iter__(self):
        ids = list(range(len(self._lens)))
        random.shuffle(ids)
        buckets = [sorted(ids[i:i + self._bucket_size], key=self._lens.__getitem__, reverse=True)
                   for i in range(0, len(ids), self._bucket_size)]
        batches = []
        for bucket in buckets:
            max_len, batch = 0, []
            for st in range(0, len(bucket), self._size_mul):
                group = bucket[st:st + self._size_mul]
                max_len = max(max_len, max(self._lens[i] for i in group))
                if max_len * (len(batch) + self._size_mul) > self._max_tok:
                    if not batch:
                        raise ValueError(f"batch_size {self._max_tok} tokens cannot hold "
                                         f"{self._size_mul} examples of length {max_len}")
                    batches.append(batch)
                    batch = list(group)
                else:
                    batch.extend(group)
            if batch and not self._droplast:
                batches.append(batch)
        random.shuffle(batches)
        return iter(batches)

    def __len__(self):
        raise TypeError("TokenBucketSampler has no fixed length: batches change every epoch")
