package org.llamaship.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Test

class JsonTest {
    @Test fun parsesValues() {
        val v = Json.parse("""{"a": [1, -2.5, 3e2, true, false, null], "s": "x\"\\\n\u00e9\ud83d\ude42", "o": {}}""") as Map<*, *>
        assertEquals(listOf(1L, -2.5, 300.0, true, false, null), v["a"])
        assertEquals("x\"\\\né🙂", v["s"])
        assertEquals(emptyMap<String, Any>(), v["o"])
        assertNull(Json.parse("null"))
    }

    @Test(expected = JsonException::class) fun rejectsTrailingGarbage() { Json.parse("{} x") }
    @Test(expected = JsonException::class) fun rejectsUnterminated() { Json.parse("[1, 2") }
    @Test(expected = JsonException::class) fun rejectsBareWords() { Json.parse("{a: 1}") }
}
