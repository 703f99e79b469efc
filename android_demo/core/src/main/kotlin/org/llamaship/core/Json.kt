package org.llamaship.core

/**
 * A small strict JSON reader (RFC 8259) so the core stays dependency-free and runs unchanged on
 * the JVM and on Android. Objects become Map<String, Any?>, arrays List<Any?>, numbers Double or
 * Long (when integral and without exponent), plus String, Boolean and null.
 */
class JsonException(message: String) : Exception(message)

object Json {
    fun parse(text: String): Any? {
        val p = Parser(text)
        p.skipWs()
        val value = p.value()
        p.skipWs()
        if (p.pos != text.length) throw JsonException("trailing characters at offset ${p.pos}")
        return value
    }

    private class Parser(val s: String) {
        var pos = 0

        fun skipWs() {
            while (pos < s.length && s[pos] in " \t\r\n") pos++
        }

        fun value(): Any? {
            if (pos >= s.length) throw JsonException("unexpected end of input")
            return when (val c = s[pos]) {
                '{' -> obj()
                '[' -> arr()
                '"' -> str()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> if (c == '-' || c.isDigit()) num() else throw JsonException("unexpected '$c' at offset $pos")
            }
        }

        fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, pos)) throw JsonException("bad literal at offset $pos")
            pos += word.length
            return v
        }

        fun obj(): Map<String, Any?> {
            val out = LinkedHashMap<String, Any?>()
            pos++
            skipWs()
            if (peek() == '}') { pos++; return out }
            while (true) {
                skipWs()
                if (peek() != '"') throw JsonException("expected a key at offset $pos")
                val key = str()
                skipWs()
                expect(':')
                skipWs()
                out[key] = value()
                skipWs()
                when (next()) {
                    ',' -> continue
                    '}' -> return out
                    else -> throw JsonException("expected ',' or '}' at offset ${pos - 1}")
                }
            }
        }

        fun arr(): List<Any?> {
            val out = ArrayList<Any?>()
            pos++
            skipWs()
            if (peek() == ']') { pos++; return out }
            while (true) {
                skipWs()
                out.add(value())
                skipWs()
                when (next()) {
                    ',' -> continue
                    ']' -> return out
                    else -> throw JsonException("expected ',' or ']' at offset ${pos - 1}")
                }
            }
        }

        fun str(): String {
            expect('"')
            val sb = StringBuilder()
            while (true) {
                if (pos >= s.length) throw JsonException("unterminated string")
                val c = s[pos++]
                when {
                    c == '"' -> return sb.toString()
                    c == '\\' -> {
                        when (val e = s[pos++]) {
                            '"', '\\', '/' -> sb.append(e)
                            'b' -> sb.append('\b')
                            'f' -> sb.append('\u000C')
                            'n' -> sb.append('\n')
                            'r' -> sb.append('\r')
                            't' -> sb.append('\t')
                            'u' -> {
                                if (pos + 4 > s.length) throw JsonException("bad \\u escape")
                                sb.append(s.substring(pos, pos + 4).toInt(16).toChar())
                                pos += 4
                            }
                            else -> throw JsonException("bad escape \\$e")
                        }
                    }
                    c < ' ' -> throw JsonException("control character in string at offset ${pos - 1}")
                    else -> sb.append(c)
                }
            }
        }

        fun num(): Any {
            val start = pos
            if (peek() == '-') pos++
            while (pos < s.length && (s[pos].isDigit() || s[pos] in ".eE+-")) pos++
            val text = s.substring(start, pos)
            val integral = text.none { it in ".eE" }
            return try {
                if (integral) text.toLong() else text.toDouble()
            } catch (e: NumberFormatException) {
                throw JsonException("bad number '$text'")
            }
        }

        fun peek(): Char = if (pos < s.length) s[pos] else '\u0000'
        fun next(): Char = if (pos < s.length) s[pos++] else throw JsonException("unexpected end of input")
        fun expect(c: Char) {
            if (next() != c) throw JsonException("expected '$c' at offset ${pos - 1}")
        }
    }
}
