//! The random prompt tokens: `std::mt19937` seeded with `--seed` and libstdc++'s
//! `std::uniform_int_distribution<int32_t>(0, n_vocab - 1)`, bit for bit, so that the token ids (and the
//! rows of a resumed run) are those of the C++ tool this replaces.

/// The 32-bit Mersenne Twister (`std::mt19937`).
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// Seeded as `std::mt19937(seed)`.
    pub fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1812433253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A value in [0, n) as libstdc++'s `uniform_int_distribution` draws it from a 32-bit generator
    /// (Lemire's nearly divisionless method, 64-bit products); n >= 1.
    pub fn below(&mut self, n: u32) -> u32 {
        let mut product = self.next_u32() as u64 * n as u64;
        let mut low = product as u32;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                product = self.next_u32() as u64 * n as u64;
                low = product as u32;
            }
        }
        (product >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::Mt19937;

    #[test]
    fn mt19937_matches_the_standard() {
        // the C++ standard's check: the 10000th output of a default-constructed mt19937 (seed 5489)
        let mut g = Mt19937::new(5489);
        let v = (0..10000).map(|_| g.next_u32()).last().unwrap();
        assert_eq!(v, 4123659995);
    }

    #[test]
    fn uniform_draws_match_libstdcxx() {
        // std::uniform_int_distribution<int32_t>(0, n - 1) over std::mt19937(seed), printed by g++ 12
        let mut g = Mt19937::new(42);
        let v: Vec<u32> = (0..8).map(|_| g.below(1024)).collect();
        assert_eq!(v, [383, 815, 973, 187, 749, 798, 613, 611]);
        let mut g = Mt19937::new(7);
        let v: Vec<u32> = (0..8).map(|_| g.below(49152)).collect();
        assert_eq!(v, [3750, 11174, 38334, 15678, 21548, 48081, 35559, 22392]);
    }
}
